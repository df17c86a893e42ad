"""The Ray executor (``lesionbench run --executor ray``) on a local two-CPU Ray instance: the same
table as a local run cell for cell, a worker killed mid-block costs only that block, ``--resume``
across executors, and the one-line errors (Ray not installed, a plugin missing on the workers).

Two plugin packages are made here as installed distributions (a ``.dist-info`` with an entry
point): ``lesionbench_faults`` on every worker (PYTHONPATH set before Ray starts), whose
perturbation kills its own worker process once when an "armed" file exists; and
``lesionbench_driveronly``, on the driver's sys.path alone.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

import lesionbench.cli as cli
import lesionbench.registry
from conftest import write_fashion
from lesionbench.api import run_study
from lesionbench.cli import main
from lesionbench.registry import get_registry
from lesionbench.store import read_results, read_results_with_outcomes
from lesionbench.study import load_study
from toy_plugins import install_plugin

KEY = ["model", "layer", "perturbation", "level", "draw"]
EXACT = [
    "dataset",
    "layer_index",
    "relative_depth",
    "seed",
    "top1",
    "top5",
    "n_images",
    "device",
    "num_classes",
    "error",
    "nonfinite_weights",
]
LAYERS = ["conv1", "fc7"]
LEVELS = {"synapse_knockout": [0.0, 0.5, 1.0], "fault_scale": [0.0, 0.25, 0.5]}
DRAWS = 2
N_CELLS = 1 + len(LAYERS) * sum(1 + DRAWS * (len(v) - 1) for v in LEVELS.values())

FAULTS = '''
"""A perturbation that halves a random fraction of the weights; armed, it kills its own process once."""
import os
import signal

import torch

from lesionbench.hookspecs import hookimpl
from lesionbench.perturbation import WeightPerturbation


class FaultScale(WeightPerturbation):
    def apply(self, layer, level, generator):
        armed = os.environ.get("LESIONBENCH_TEST_ARMED", "")
        if armed and level == 0.5 and layer.display == "fc7":
            try:
                os.rename(armed, armed + ".fired")  # only the first process to get here dies
            except FileNotFoundError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        w = layer.module.weight
        w[torch.rand(w.shape, generator=generator) < level] *= 0.5


@hookimpl
def lesionbench_perturbations():
    return [FaultScale(name="fault_scale", description="halve a fraction p of the weights",
                       default_levels=(0.0, 0.5), level_range=(0.0, 1.0))]
'''

from conftest import FINISHED  # noqa: E402

DRIVER_ONLY = """
from lesionbench.hookspecs import hookimpl
from lesionbench.perturbation import WeightPerturbation


class Nothing(WeightPerturbation):
    def apply(self, layer, level, generator):
        pass


@hookimpl
def lesionbench_perturbations():
    return [Nothing(name="driver_only", description="installed on the driver only",
                    default_levels=(0.0, 1.0), level_range=(0.0, 1.0))]
"""


def install(root: Path, module: str, source: str) -> Path:
    """A distribution with one ``lesionbench`` entry point, importable once ``root`` is on the path."""
    return install_plugin(root, module, {module: module}, {module: source})


def fresh_registry(monkeypatch=None) -> None:
    importlib.invalidate_caches()
    if monkeypatch is None:
        lesionbench.registry._default = None
    else:
        monkeypatch.setattr(lesionbench.registry, "_default", None)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Ray on two CPUs, its workers (and this driver) seeing the ``lesionbench_faults`` plugin."""
    ray = pytest.importorskip("ray")
    root = install(tmp_path_factory.mktemp("site"), "lesionbench_faults", FAULTS)
    armed = tmp_path_factory.mktemp("fault") / "armed"
    saved_env = {k: os.environ.get(k) for k in ("PYTHONPATH", "LESIONBENCH_TEST_ARMED")}
    saved_registry = lesionbench.registry._default
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), saved_env["PYTHONPATH"]) if p)
    os.environ["LESIONBENCH_TEST_ARMED"] = str(armed)
    sys.path.insert(0, str(root))
    fresh_registry()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        yield armed
    finally:
        ray.shutdown()
        sys.path.remove(str(root))
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        lesionbench.registry._default = saved_registry


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=250))


def study_text(data: Path, perturbations=("synapse_knockout", "fault_scale"), levels=LEVELS) -> str:
    quoted = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    return (
        f'name = "tiny-ray"\nmodels = ["fashion_alexnet"]\nperturbations = {quoted(perturbations)}\n'
        f'layers = {quoted(LAYERS)}\ndraws = {DRAWS}\nseed = 3\ndevice = "cpu"\nbatch_size = 32\n'
        "[levels]\n"
        + "".join(f"{p} = {levels[p]}\n" for p in perturbations)
        + f'[dataset]\nname = "fashion_mnist"\npath = "{data}"\nn_images = 50\n'
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    data = write_fashion(tmp_path_factory.mktemp("data") / "fashion", n=100)
    path = tmp_path_factory.mktemp("study") / "tiny.toml"
    path.write_text(study_text(data))
    return path


@pytest.fixture(scope="module")
def reference(ray_cluster, study, tmp_path_factory) -> pd.DataFrame:
    """The local executor's table (the faults plugin is loaded, but not armed)."""
    out = tmp_path_factory.mktemp("local") / "run"
    assert main(["run", str(study), "--out", str(out), "--no-publish"]) in FINISHED
    df = read_results(out)
    assert len(df) == N_CELLS and (df["error"] == "").all()
    return df


def assert_same_table(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """No cell missing or repeated; floats within 1e-6, accuracies and everything else exactly."""
    assert not got.duplicated(KEY).any()
    assert len(got) == len(expected) == N_CELLS
    order = lambda df: df.sort_values(KEY, ignore_index=True)  # noqa: E731
    g, e = order(got), order(expected)
    pd.testing.assert_frame_equal(g[KEY + EXACT], e[KEY + EXACT], check_exact=True)
    np.testing.assert_allclose(g["loss"], e["loss"], rtol=1e-6, atol=1e-6)


def test_a_ray_run_equals_the_local_run_cell_for_cell(ray_cluster, reference, study, tmp_path):
    out = tmp_path / "ray"
    assert main(["run", str(study), "--out", str(out), "--executor", "ray", "--no-publish"]) in FINISHED
    assert_same_table(read_results(out), reference)
    assert len(set(reference["loss"])) > 5  # the perturbations did change the numbers
    # the per-image outcomes came back from the workers with their rows
    rows, outcomes = read_results_with_outcomes(out)
    assert (rows["outcome"] >= 0).all()
    labels = outcomes.images["label"].to_numpy()
    np.testing.assert_allclose(rows["top1"], (outcomes.top1[rows["outcome"]] == labels).mean(axis=1))
    by_key = lambda df: df.sort_values(KEY, ignore_index=True)["flip_rate"]  # noqa: E731
    np.testing.assert_array_equal(by_key(rows), by_key(reference))


def test_a_killed_worker_costs_only_its_block(ray_cluster, reference, study, tmp_path):
    armed = ray_cluster
    armed.write_text("")
    out = tmp_path / "killed"
    assert main(["run", str(study), "--out", str(out), "--executor", "ray", "--no-publish"]) in FINISHED
    assert not armed.exists() and Path(f"{armed}.fired").exists(), "no worker was killed"
    assert_same_table(read_results(out), reference)


@pytest.mark.parametrize("first, then", [("ray", "local"), ("local", "ray")])
def test_resume_across_executors_equals_the_full_run(ray_cluster, reference, study, tmp_path, first, then):
    out = tmp_path / "run"
    assert main(["run", str(study), "--out", str(out), "--executor", first, "--no-publish"]) in FINISHED
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    kept = lines[:8]  # the header, 7 rows, and half a row: a run stopped partway
    (out / "results.csv").write_text("".join(kept) + lines[8][: len(lines[8]) // 2])
    assert main(["run", "--resume", str(out), "--executor", then, "--no-publish"]) in FINISHED
    assert (out / "results.csv").read_text().splitlines(keepends=True)[:8] == kept
    assert_same_table(read_results(out), reference)


def test_resume_with_only_the_clean_row_missing_ticks_once_per_cell(ray_cluster, reference, study, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(study), "--out", str(out), "--no-publish"]) in FINISHED
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(line for line in lines if ",clean," not in line))
    ticks = []

    @contextmanager
    def counting(total):
        ticks.append(total)
        yield ticks.append

    run_study(load_study(str(study), {}), get_registry(), out, resume=True, progress=counting, executor="ray")
    assert ticks[0] == N_CELLS and len(ticks[1:]) == N_CELLS
    assert_same_table(read_results(out), reference)


def test_without_ray_the_error_is_one_line_and_nothing_is_written(study, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    out = tmp_path / "never"
    capsys.readouterr()
    assert main(["run", str(study), "--out", str(out), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesionbench: error:") and "pip install lesionbench[ray]" in err and "\n" not in err
    assert not out.exists()


def test_ray_address_needs_the_ray_executor(study, tmp_path, capsys):
    assert main(["run", str(study), "--out", str(tmp_path / "x"), "--ray-address", "auto"]) == 2
    assert "--executor ray" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_plugin_missing_on_the_workers_is_named_in_one_line(ray_cluster, tmp_path, monkeypatch, capsys):
    root = install(tmp_path / "driver-site", "lesionbench_driveronly", DRIVER_ONLY)
    monkeypatch.syspath_prepend(str(root))  # on the driver, not on the workers
    fresh_registry(monkeypatch)
    data = write_fashion(tmp_path / "fashion", n=50)
    spec = tmp_path / "s.toml"
    spec.write_text(study_text(data, perturbations=("driver_only",), levels={"driver_only": [0.0, 1.0]}))
    out = tmp_path / "never"
    capsys.readouterr()
    assert main(["run", str(spec), "--out", str(out), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesionbench: error:") and "\n" not in err, err
    assert "lesionbench_driveronly" in err and "every worker" in err
    assert not out.exists()
