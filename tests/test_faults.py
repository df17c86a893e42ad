"""Fault injection: a study killed with SIGKILL at random moments, stopped by SIGTERM, or run out
of disk space, and resumed, ends with exactly the table of an uninterrupted run — no cell missing,
none repeated, no torn row; a second process on the same run directory is refused; ``--resume`` is
idempotent."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

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


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """The study, and the table of its uninterrupted run (made once for every fault below)."""
    tmp_path = tmp_path_factory.mktemp("faults")
    spec = study(tmp_path)
    reference = tmp_path / "ref"
    assert cli("run", str(spec), "--out", str(reference)).wait(timeout=300) == 0
    return spec, read_results(reference)


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path, case):
    spec, expected = case
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


def _same_table(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert not got.duplicated(KEY).any() and len(got) == len(expected)
    order = lambda df: df.drop(columns=TIMING).sort_values(KEY, ignore_index=True)  # noqa: E731
    pd.testing.assert_frame_equal(order(got), order(expected))


def _not_warnings(stderr: str) -> str:
    """stderr without warning lines (these cases use untrained models: their clean accuracy is at chance)."""
    return "\n".join(l for l in stderr.strip().splitlines() if not l.startswith("lesionbench: warning:"))


def test_sigterm_stops_with_one_line_and_resume_completes_the_run(tmp_path, case):
    spec, expected = case
    run = tmp_path / "terminated"
    proc = cli("run", str(spec), "--out", str(run))
    while rows(run / "results.csv") < 10 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    err = _not_warnings(proc.stderr.read().decode())
    assert err == f"lesionbench: terminated (SIGTERM); finish it with: lesionbench run --resume {run}"
    written = read_results(run)
    assert 10 <= len(written) < len(expected)  # whole rows only: the cell in flight was dropped
    assert cli("run", "--resume", str(run)).wait(timeout=300) == 0
    _same_table(read_results(run), expected)


def test_a_full_disk_keeps_whole_rows_and_resume_completes_once_space_is_back(tmp_path, case):
    import resource

    spec, expected = case
    run = tmp_path / "full"
    limit = 4000  # bytes a file may grow to: the results file fills up after a dozen rows

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "lesionbench.cli", "run", str(spec), "--out", str(run)], env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=small_disk)  # fmt: skip
    assert proc.returncode == 2
    err = _not_warnings(proc.stderr)
    assert "\n" not in err and "File too large" in err and f"lesionbench run --resume {run}" in err
    data = (run / "results.csv").read_bytes()
    assert data.endswith(b"\n") and len(data) <= limit
    assert 5 < len(read_results(run)) < len(expected)
    assert cli("run", "--resume", str(run)).wait(timeout=300) == 0
    _same_table(read_results(run), expected)


def test_a_second_run_on_the_same_directory_is_refused_while_the_first_holds_it(tmp_path, case):
    from lesionbench.store import RunDir

    spec, _expected = case
    run = tmp_path / "busy"
    assert cli("run", str(spec), "--out", str(run), "--layers", "conv1", "--draws", "1").wait(timeout=300) == 0
    before = (run / "results.csv").read_bytes()
    with RunDir.open_existing(run):  # the first run, still writing
        second = subprocess.run([sys.executable, "-m", "lesionbench.cli", "run", "--resume", str(run)],
                                capture_output=True, text=True, timeout=300)  # fmt: skip
    assert second.returncode == 2
    assert second.stderr.strip() == (f"lesionbench: error: another lesionbench run is writing to {str(run)!r} "
                                     "(it holds .lock); wait for it to finish")  # fmt: skip
    assert (run / "results.csv").read_bytes() == before


def test_resume_is_idempotent_for_a_job_script(tmp_path, case):
    spec, _expected = case
    run = tmp_path / "job"
    args = ("run", str(spec), "--resume", str(run), "--layers", "conv1", "--draws", "1")
    first = subprocess.run([sys.executable, "-m", "lesionbench.cli", *args], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr  # no run there yet: started
    table = (run / "results.csv").read_bytes()
    again = subprocess.run([sys.executable, "-m", "lesionbench.cli", *args], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"{run} is complete: nothing to resume" in again.stdout.replace("\n", "")
    assert (run / "results.csv").read_bytes() == table
