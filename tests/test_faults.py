"""Fault injection: a study killed with SIGKILL at random moments and resumed each time ends with
exactly the table of an uninterrupted run — no cell missing, none repeated, no torn row."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from lesionbench.store import read_results
from conftest import write_fashion

KEY = ["model", "layer", "perturbation", "level", "draw"]
TIMING = ["seconds", "images_per_s"]


def study(tmp_path: Path) -> Path:
    data = write_fashion(tmp_path / "fashion", n=40)
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "faults"\nmodels = [{ref = "fashion_alexnet", weights = "none"}]\n'
        'layers = ["conv1", "conv4", "fc7"]\ndraws = 3\nseed = 5\ndevice = "cpu"\nbatch_size = 20\n'
        f'[dataset]\nname = "fashion_mnist"\npath = "{data}"\nn_images = 40\n'
    )
    return path


def cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "lesionbench.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return -1


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    spec = study(tmp_path)
    reference = tmp_path / "ref"
    assert cli("run", str(spec), "--out", str(reference)).wait(timeout=300) == 0
    expected = read_results(reference)
    total = len(expected)

    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    proc = cli("run", str(spec), "--out", str(run))
    for target in sorted(rng.sample(range(5, total - 5), 4)):
        while rows(run / "results.csv") < target and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.05)  # anywhere inside the next cell, mid-write included
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        proc = cli("run", "--resume", str(run))
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert kills >= 3

    got = read_results(run)
    assert not got.duplicated(KEY).any()
    assert len(got) == total
    order = lambda df: df.drop(columns=TIMING).sort_values(KEY, ignore_index=True)  # noqa: E731
    pd.testing.assert_frame_equal(order(got), order(expected))
