"""Fault injection: a study killed with SIGKILL at random moments, stopped by SIGTERM, or run out
of disk space, and resumed, ends with exactly the table of an uninterrupted run — no cell missing,
none repeated, no torn row — and with the same per-image outcomes, cell for cell; a second process
on the same run directory is refused; ``--resume`` is idempotent."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import (
    FINISHED,  # noqa: E402
    write_fashion,
)
from lesionbench.store import OUTCOME, OUTCOMES, RunDir, Subset, read_results, read_results_with_outcomes

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
    """``lesionbench ARGS`` in a process of its own; a run draws no figures (no test here reads them)."""
    env = dict(os.environ, COLUMNS="200")
    args = (*args, "--no-plots") if args[0] == "run" else args
    return subprocess.Popen(
        [sys.executable, "-m", "lesionbench.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return -1


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> tuple[Path, pd.DataFrame, Path]:
    """The study, the table of its uninterrupted run (made once for every fault below) and its directory."""
    tmp_path = tmp_path_factory.mktemp("faults")
    spec = study(tmp_path)
    reference = tmp_path / "ref"
    assert cli("run", str(spec), "--out", str(reference)).wait(timeout=900) in FINISHED  # a loaded machine: minutes
    return spec, read_results(reference), reference


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path, case):
    spec, expected, reference = case
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
    assert proc.wait(timeout=300) in FINISHED, proc.stderr.read().decode()
    assert kills >= 3

    got = read_results(run)
    assert not got.duplicated(KEY).any()
    assert len(got) == total
    order = lambda df: df.drop(columns=TIMING).sort_values(KEY, ignore_index=True)  # noqa: E731
    pd.testing.assert_frame_equal(order(got), order(expected))

    table, outcomes = read_results_with_outcomes(run)
    ref_table, ref_outcomes = read_results_with_outcomes(reference)
    assert (table["outcome"] >= 0).all() and len(outcomes) == len(table)  # every row has its outcomes, once
    mine = table.sort_values(KEY)["outcome"].to_numpy()
    theirs = ref_table.sort_values(KEY)["outcome"].to_numpy()
    np.testing.assert_array_equal(outcomes.top1[mine], ref_outcomes.top1[theirs])
    np.testing.assert_array_equal(outcomes.top5[mine], ref_outcomes.top5[theirs])
    # the flip rate in each row is the one its outcomes give
    clean = outcomes.top1[table.loc[table["perturbation"] == "clean", "outcome"].iloc[0]]
    np.testing.assert_allclose(table["flip_rate"], (outcomes.top1[table["outcome"]] != clean).mean(axis=1))


def _row(draw: int, outcome: tuple | None = None) -> dict:
    """A row whose accuracies are those its outcomes give (labels 0, 1, 2, 0, 1, 2, 0, 1), as the schema requires."""
    labels = np.arange(8) % 3
    top1, top5 = ((outcome[0] == labels).mean(), np.mean(outcome[1])) if outcome is not None else (float("nan"),) * 2
    row = dict(
        model="m",
        dataset="d",
        layer="l",
        perturbation="p",
        level=0.5,
        draw=draw,
        top1=float(top1),
        top5=float(top5),
        loss=1.0,
        n_images=8,
        error="" if outcome is not None else "failed",
        num_classes=10,
    )
    return row | ({OUTCOME: outcome} if outcome is not None else {})


def test_a_torn_outcome_batch_and_an_outcome_without_its_row_are_repaired_on_resume(tmp_path):
    """The two states a SIGKILL can leave between a cell's outcomes and its row, made on purpose."""
    subset = Subset("d", "test", np.arange(100, 108), np.arange(8) % 3)
    top1 = lambda k: np.arange(8, dtype=np.int32) + k  # noqa: E731
    with RunDir.create(tmp_path / "r", {"name": "s"}, "f", subset=subset) as run:
        for k in range(3):
            run.append(_row(k, (top1(k), (top1(k) == np.arange(8) % 3) | (np.arange(8) < k))))  # top-5 ⊇ top-1
    size = (tmp_path / "r" / OUTCOMES).stat().st_size
    with RunDir.open_existing(
        tmp_path / "r", "f", subset
    ) as run:  # killed after the outcomes of draw 3, before its row
        from lesionbench.store import _OutcomeWriter

        orphan = _OutcomeWriter(run.outcomes_path, subset)
        orphan.append(_row(3), top1(99), np.zeros(8, bool))
        orphan.close()
    whole = (tmp_path / "r" / OUTCOMES).read_bytes()
    (tmp_path / "r" / OUTCOMES).write_bytes(whole + whole[size : size + 40])  # and a torn batch after it
    with RunDir.open_existing(tmp_path / "r", "f", subset) as run:
        assert run.outcomes_path.stat().st_size == len(whole)  # the torn batch is cut, whole batches stay
        run.append(_row(3, (top1(3), np.ones(8, bool))))  # the cell, run again
        run.append(_row(4))  # a failed cell: a row, no outcomes
    rows, outcomes = read_results_with_outcomes(tmp_path / "r")
    assert list(rows["draw"]) == [0, 1, 2, 3, 4]
    assert list(rows["outcome"][:4] >= 0) == [True] * 4 and rows["outcome"].iloc[4] == -1
    np.testing.assert_array_equal(outcomes.top1[rows["outcome"][:4]], np.stack([top1(k) for k in range(4)]))
    assert outcomes.top5[rows["outcome"].iloc[3]].all()  # the batch written with the row, not the orphan
    assert list(outcomes.images["index"]) == list(range(100, 108)) and list(outcomes.images["label"]) == [
        0,
        1,
        2,
    ] * 2 + [0, 1]


def _same_table(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert not got.duplicated(KEY).any() and len(got) == len(expected)
    order = lambda df: df.drop(columns=TIMING).sort_values(KEY, ignore_index=True)  # noqa: E731
    pd.testing.assert_frame_equal(order(got), order(expected))


def _not_warnings(stderr: str) -> str:
    """stderr without warning lines (these cases use untrained models: their clean accuracy is at chance)."""
    return "\n".join(l for l in stderr.strip().splitlines() if not l.startswith("lesionbench: warning:"))


def test_sigterm_stops_with_one_line_and_resume_completes_the_run(tmp_path, case):
    spec, expected, _reference = case
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
    assert cli("run", "--resume", str(run)).wait(timeout=300) in FINISHED
    _same_table(read_results(run), expected)


# `lesionbench run ARGS` whose third weight-noise draw is stuck in native code (libc's system(), which
# retries its wait on EINTR) until the file RELEASE exists; MARKER says it is stuck.
STUCK = """import ctypes, sys
import lesionbench.plugins.weight_noise as noise
from lesionbench.cli import main
marker, release, calls, draw = sys.argv[1], sys.argv[2], [], noise.add_scaled_noise
def stuck(*args, **kwargs):
    calls.append(None)
    if len(calls) == 3:
        open(marker, "w").close()
        ctypes.CDLL(None).system(f"while [ ! -e '{release}' ]; do sleep 0.2; done".encode())
    return draw(*args, **kwargs)
noise.add_scaled_noise = stuck
sys.exit(main(sys.argv[3:]))
"""


def test_sigterm_during_a_cell_stuck_in_native_code_exits_without_waiting_for_it(tmp_path, case):
    spec, expected, _reference = case
    run, marker, release = tmp_path / "stuck", tmp_path / "in-the-cell", tmp_path / "release"
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(marker), str(release), "run", str(spec), "--out", str(run), "--no-plots"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)  # the cell never returns by itself: RELEASE does not exist yet
    finally:
        release.touch()
    assert code == 143
    err = _not_warnings(proc.stderr.read().decode())
    assert err == f"lesionbench: terminated (SIGTERM); finish it with: lesionbench run --resume {run}"
    assert len(read_results(run)) < len(expected)
    assert cli("run", "--resume", str(run)).wait(timeout=900) in FINISHED
    _same_table(read_results(run), expected)


def test_a_full_disk_keeps_whole_rows_and_resume_completes_once_space_is_back(tmp_path, case):
    import resource

    spec, expected, _reference = case
    run = tmp_path / "full"
    limit = 12000  # bytes a file may grow to: outcomes.arrow (about 1 KB a cell here) fills up after a dozen cells

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "lesionbench.cli", "run", str(spec), "--out", str(run), "--no-plots"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_disk,
    )
    assert proc.returncode == 2
    err = _not_warnings(proc.stderr)
    assert "\n" not in err and "File too large" in err and f"lesionbench run --resume {run}" in err
    data = (run / "results.csv").read_bytes()
    assert data.endswith(b"\n") and len(data) <= limit
    from lesionbench.store import _valid_stream_bytes

    assert _valid_stream_bytes(run / OUTCOMES) == (run / OUTCOMES).stat().st_size  # whole outcome batches only
    assert 5 < len(read_results(run)) < len(expected)
    assert cli("run", "--resume", str(run)).wait(timeout=300) in FINISHED
    _same_table(read_results(run), expected)


def test_a_second_run_on_the_same_directory_is_refused_while_the_first_holds_it(tmp_path, case):
    from lesionbench.store import RunDir

    spec, _expected, _reference = case
    run = tmp_path / "busy"
    assert cli("run", str(spec), "--out", str(run), "--layers", "conv1", "--draws", "1").wait(timeout=300) in FINISHED
    before = (run / "results.csv").read_bytes()
    with RunDir.open_existing(run):  # the first run, still writing
        second = subprocess.run(
            [sys.executable, "-m", "lesionbench.cli", "run", "--resume", str(run)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"lesionbench: error: another lesionbench run is writing to {str(run)!r} "
        "(it holds .lock); wait for it to finish"
    )
    assert (run / "results.csv").read_bytes() == before


def test_resume_is_idempotent_for_a_job_script(tmp_path, case):
    spec, _expected, _reference = case
    run = tmp_path / "job"
    args = ("run", str(spec), "--resume", str(run), "--layers", "conv1", "--draws", "1", "--no-plots")
    first = subprocess.run(
        [sys.executable, "-m", "lesionbench.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert first.returncode in FINISHED, first.stderr  # no run there yet: started
    table = (run / "results.csv").read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "lesionbench.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and f"{run} is complete: nothing to resume" in again.stdout.replace("\n", "")
    assert (run / "results.csv").read_bytes() == table


def test_the_resume_hint_imports_no_torch(tmp_path, monkeypatch):
    """Found by the fault benchmark: SIGTERM at 1.4 CPU s, inside torch's own import, then the hint's
    import of lesionbench.store imported torch again ("duplicate registrations for aten.linspace"): a
    traceback and exit 1. The hint must not need torch (here, importing it fails)."""
    from lesionbench.cli import _resume_hint

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch → ImportError
    monkeypatch.delitem(sys.modules, "lesionbench.store", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    (run / "results.csv").write_text("")
    assert _resume_hint(run, ["run", "s.toml"]) == f"; finish it with: lesionbench run --resume {run}"
    assert _resume_hint(tmp_path / "none", ["run", "s.toml", "--out", "x"]).endswith(
        "nothing was written: start it again with: lesionbench run s.toml --out x"
    )


@pytest.mark.parametrize(
    "signame, code, what", [("SIGTERM", 143, "terminated (SIGTERM)"), ("SIGINT", 130, "interrupted")]
)
def test_an_interrupt_while_the_command_line_starts_is_one_line_and_no_traceback(signame, code, what):
    """Found by the fault benchmark (5 of 69 trials, all in the first 1.5 CPU s): SIGTERM or Ctrl-C
    while torch was being imported raised inside its import, and the process then printed a traceback
    (a half-initialised torch imported again) or crashed (SIGSEGV). Until the imports are done, the
    command line's own process now ends at once with one line; here the signal arrives while a
    module that sleeps is being imported."""
    program = (
        "import os, signal, sys, threading\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal (a background job ignores it)
        "sys.argv = ['-m', 'run', 'study.toml', '--out', 'runs/x']\n"  # as `python -m lesionbench.cli` sees it
        "import lesionbench.cli\n"
        f"threading.Timer(0.2, os.kill, (os.getpid(), signal.{signame})).start()\n"
        "import time; time.sleep(30)\n"  # still starting: the command has not imported the registry yet
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"lesionbench: {what} while starting; nothing was written: start it again with: "
        "lesionbench run study.toml --out runs/x"
    ]


def test_a_program_that_imports_the_command_line_keeps_its_own_signal_handlers():
    program = (
        "import signal, sys\n"
        "sys.argv = ['my_program.py']\n"
        "before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)\n"
        "import lesionbench.cli\n"
        "assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_an_ignored_ctrl_c_stays_ignored_while_the_command_line_starts():
    """nohup and background jobs start with SIGINT ignored: the start-up guard leaves it so."""
    program = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "sys.argv = ['-m', 'run', 'study.toml']\n"
        "import lesionbench.cli\n"
        "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL\n"  # SIGTERM is guarded
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
