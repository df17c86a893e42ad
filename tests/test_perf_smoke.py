"""Every script in perf/ runs, on tiny settings, as a user would run it: none can rot unseen.

Each is started as its own process (``python perf/NAME.py ...``) with settings small enough
for the suite; what is checked is that it exits 0 and prints the table (or line) it exists for.
Timings themselves are never asserted: a benchmark's numbers belong in its own full run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_fashion

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "perf"


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fmnist") / "fashion", n=20)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """Six small JPEGs named as the ImageNet sample is (``<wnid>_<name>.JPEG``)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for i, wnid in enumerate(["n01440764", "n01443537", "n01484850"] * 2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{wnid}_{i}.JPEG")
    return root


def _args(name: str, tmp: Path, fashion: Path, imagenet: Path) -> list[str]:
    demo = ["--n-images", "20", "--data", str(fashion)]
    return {
        "adaptive_draws.py": ["--out", str(tmp / "adaptive"), "--max-draws", "3", "--levels", "0,0.5", *demo],
        "engine_ratios.py": [
            "--only",
            "default",
            "--images",
            "2",
            "--batch",
            "8",
            "--draws",
            "1",
            "--levels",
            "0.5",
            "--skip",
            "dataloader,batched",
            "--threads",
            "1",
        ],
        "fast_vs_naive.py": ["--only", "fashion_alexnet", "--images", "4"],
        "fixed_costs.py": [
            "--repeat",
            "1",
            "--out",
            str(tmp / "fixed"),
            "--damage-size",
            "40960",
            "--run-args",
            f"--n-images 20 --data {fashion} --draws 1 --levels 0,0.5 --layers conv1,fc8",
        ],
        "gpu_paper_protocol.py": [
            "--device",
            "cpu",
            "--images",
            "64",
            "--size",
            "64",
            "--layers",
            "fc8",
            "--draws",
            "1",
            "--levels",
            "0.5",
            "--batch",
            "32",
            "--configs",
            "naive,fast_batched",
        ],
        "imagenet_shards.py": ["--data", str(imagenet), "--images", "6", "--batch", "2", "--budget", "100K"],
        "outcome_cost.py": [
            "--out",
            str(tmp / "outcomes"),
            "--run-args",
            f"--n-images 20 --data {fashion} --draws 1 --levels 0,0.5 --layers conv1,fc8",
        ],
        "scale.py": ["--images", "8", "--size", "64", "--batch", "4", "--layers", "fc8", "--out", str(tmp / "scale")],
        "scoring_cost.py": [],
        "calibration.py": ["--studies", "2", "--replicates", "20", "--draws", "2", "--spreads", "realistic"],
        "track_timing.py": ["--data", str(imagenet), "--models", "efficientnet_lite0", "--images", "3"],
        "zoo_survey.py": ["--only", "resnet10t", "--images", "2", "--layers", "2", "--threads", "1"],
        "test_bench_engine.py": [],
    }[name]


EXPECTED = {  # a line each script exists to print
    "adaptive_draws.py": "| adaptive",
    "engine_ratios.py": "| default (fashion_alexnet, 28×28) |",
    "fast_vs_naive.py": "fashion_alexnet",
    "fixed_costs.py": "| **imports + publishing** |",
    "gpu_paper_protocol.py": "| fast_batched |",
    "imagenet_shards.py": "rows equal (every column but timing, exactly): True; per-image outcomes equal: True",
    "outcome_cost.py": "| **all of it** |",
    "scale.py": "| 8 | bound | fc8 |",
    "scoring_cost.py": "cells; publish without outcomes",
    "track_timing.py": "| efficientnet_lite0 |",
    "zoo_survey.py": "resnet10t",
    "test_bench_engine.py": "passed",
    "calibration.py": "| 2 |",
}
# Scripts whose smoke test lives beside the feature they measure: script → (test file, test name).
ELSEWHERE = {
    "faults.py": ("test_result_files.py", "test_the_fault_benchmark_smoke"),
    "properties.py": ("test_properties.py", "test_the_long_mode_prints_its_counts"),
    "seed_gate.py": ("test_calibration.py", "test_the_seed_gate_benchmark_runs"),
    "llm_track_timing.py": ("test_llm.py", "test_the_llm_track_timing_benchmark_runs"),
}


def test_every_benchmark_script_has_a_smoke_test():
    assert {p.name for p in BENCHMARKS.glob("*.py")} == set(EXPECTED) | set(ELSEWHERE)
    for test_file, name in ELSEWHERE.values():
        assert f"def {name}(" in (Path(__file__).parent / test_file).read_text(), (test_file, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_runs_on_tiny_settings(name, tmp_path, fashion, imagenet):
    if name == "scale.py" and not Path("/usr/bin/time").is_file():
        pytest.skip("scale.py measures peak memory with /usr/bin/time, which this machine lacks")
    env = os.environ | {"OMP_NUM_THREADS": "1", "LESIONBENCH_SPILL_DIR": str(tmp_path)}
    if name == "test_bench_engine.py":
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-disable",
            str(BENCHMARKS / name),
        ]
    else:
        command = [sys.executable, str(BENCHMARKS / name), *_args(name, tmp_path, fashion, imagenet)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert EXPECTED[name] in done.stdout, done.stdout[-3000:]
