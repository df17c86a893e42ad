"""Fault injection: interrupt a tiny study at uniformly random instants, finish it, compare with an uninterrupted run.

    python perf/faults.py [--trials 50] [--disk-trials 10] [--out DIR] [--seed 0] [--json FILE] [--signals ...]

The study (one untrained Fashion-MNIST AlexNet on 20 synthetic images, two layers, weight noise at
two levels, two draws: 9 cells) runs through the command line, figures and leaderboard included.
One uninterrupted run gives the reference and its wall time T (start-up to the leaderboard). Then,
for each of SIGKILL, SIGTERM and SIGINT, ``--trials`` runs are each sent the signal at an instant
drawn uniformly from [0, T] (start-up, evaluation and publishing all get hit in proportion to
their time) and then finished as a user would: with the command the interrupted run printed
(``lesionbench run --resume DIR``, or the same command again when nothing was written), or after a
SIGKILL with the job-script form ``lesionbench run STUDY --resume DIR``. A full disk is imitated
with RLIMIT_FSIZE (writes past the limit fail with EFBIG, as tests/test_faults.py does): a limit
below the final size of ``outcomes.arrow`` hits the rows, one between the results files and the
largest figure hits publishing; the run is then resumed with no limit.

A trial **survives** when the finishing command exits 0 and the final ``results.csv`` (timings and
checksums aside, rows in key order), every cell's per-image outcomes and ``LEADERBOARD.md`` (its images/s
and study-time columns aside) equal the reference's; otherwise it is **lost**. Also counted: interrupted runs that printed a Python
traceback. Each trial is printed as it ends; the summary (tried / survived / lost per fault) is
printed at the end and written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_fashion  # noqa: E402  (the suite's synthetic Fashion-MNIST files)

from lesionbench.store import read_results_with_outcomes  # noqa: E402

KEY = ["model", "layer", "perturbation", "level", "draw"]
FINISHED = (0, 3)  # a run that finished: 3 when its model is at chance (the random test images) and not scored
VOLATILE = ["seconds", "images_per_s"]  # wall-clock timings differ between any two runs
STUDY = """name = "faults"
models = [{{ref = "fashion_alexnet", weights = "none"}}]
layers = ["conv1", "fc8"]
perturbations = ["weight_noise"]
levels = {{weight_noise = [0.5, 1.0]}}
draws = 2
seed = 5
device = "cpu"
batch_size = 20
[dataset]
name = "fashion_mnist"
path = "{data}"
n_images = 20
"""


def cli(args: list[str], limit: int | None = None) -> subprocess.Popen:
    def child():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell ignores SIGINT, and children inherit it
        if limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "lesionbench.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=child)  # fmt: skip


def state(run: Path) -> tuple:
    """What must equal the reference: rows (timings aside) in key order, per-image outcomes, the leaderboard."""
    df, outcomes = read_results_with_outcomes(run)
    df = df.sort_values(KEY, ignore_index=True)
    top1 = outcomes.top1[df["outcome"].to_numpy()].tobytes()
    top5 = outcomes.top5[df["outcome"].to_numpy()].tobytes()
    rows = df.drop(columns=VOLATILE + ["outcome"]).to_csv(index=False)
    return rows, top1, top5, leaderboard(run / "LEADERBOARD.md")


def leaderboard(path: Path) -> str:
    """LEADERBOARD.md with its two wall-clock columns (images/s, study time) blanked."""
    out, blank = [], []
    for line in path.read_text().splitlines():
        cells = line.split("|")
        if not line.startswith("|"):
            blank = []
        elif "images/s" in line or "study time" in line:
            blank = [i for i, c in enumerate(cells) if c.strip() in ("images/s", "study time")]
        else:
            cells = ["" if i in blank else c for i, c in enumerate(cells)]
        out.append("|".join(cells))
    return "\n".join(out)


def finish(run: Path, study: Path, stderr: str, timeout: float) -> tuple[int, str]:
    """Finish an interrupted run with the command it printed (else the job-script form)."""
    hint = re.search(r"(?:finish it with: |start it again with: |finish with )lesionbench (.+)$", stderr.strip())
    args = shlex.split(hint.group(1)) if hint else ["run", str(study), "--resume", str(run)]
    proc = cli(args)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def trial(kind: str, run: Path, study: Path, reference: tuple, when: float, limit: int | None, timeout: float) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    proc = cli(["run", str(study), "--out", str(run)], limit=limit)
    hit = False
    if kind != "disk":
        try:
            proc.wait(timeout=when)
        except subprocess.TimeoutExpired:
            proc.send_signal(getattr(signal, kind))
            hit = True
    _, err = proc.communicate(timeout=timeout)
    first = proc.returncode
    rc, err2 = finish(run, study, err, timeout)
    try:
        same = rc in FINISHED and state(run) == reference
    except Exception as exc:  # a final state that cannot even be read back is lost
        same, err2 = False, f"{err2}\n{exc}"
    return {"kind": kind, "at": round(when, 3), "limit": limit, "hit": hit, "exit": first, "finish_exit": rc,
            "traceback": "Traceback" in err, "survived": same,
            "stderr": err.strip().splitlines()[-1:] if err.strip() else [], "finish_stderr": err2.strip()[-300:]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="trials per signal (default: 50)")
    parser.add_argument("--disk-trials", type=int, default=10, help="full-disk trials, rows and plots each (default: 10)")
    parser.add_argument("--out", type=Path, default=Path("runs/faults"), help="work directory (default: runs/faults)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instants and limits (default: 0)")
    parser.add_argument("--json", type=Path, help="write the summary and every trial here")
    parser.add_argument("--signals", default="SIGKILL,SIGTERM,SIGINT",
                        help="comma-separated signals to try (default: SIGKILL,SIGTERM,SIGINT)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    data = write_fashion(args.out / "data", n=40)
    study = args.out / "study.toml"
    study.write_text(STUDY.format(data=data.resolve()))
    ref = args.out / "reference"
    start = time.perf_counter()
    proc = cli(["run", str(study), "--out", str(ref)])
    _, err = proc.communicate(timeout=900)
    wall = time.perf_counter() - start
    if proc.returncode not in FINISHED:
        sys.exit(f"the reference run failed: {err}")
    reference = state(ref)
    sizes = {p.name: p.stat().st_size for p in ref.rglob("*") if p.is_file()}
    rows_top = sizes["outcomes.arrow"]
    plots = sorted(s for n, s in sizes.items() if n.endswith(".png"))
    print(f"reference: {len(reference[0].splitlines()) - 1} rows in {wall:.1f} s; outcomes.arrow {rows_top} B, "
          f"largest figure {plots[-1]} B", flush=True)  # fmt: skip
    timeout = max(600.0, 20 * wall)
    plan = [(k, rng.uniform(0, wall), None) for k in args.signals.split(",") if k for _ in range(args.trials)]
    files = max(sizes["results.csv"], rows_top, sizes["manifest.json"])
    plan += [("disk", 0.0, rng.randrange(600, rows_top)) for _ in range(args.disk_trials)]
    plan += [("disk", 0.0, rng.randrange(files + 1, plots[-1])) for _ in range(args.disk_trials)]
    rng.shuffle(plan)  # the machine's load drifts: spread it over every kind of fault
    trials = []

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # stopped early (a deadline): the trials finished so far are summarised
    for i, (kind, when, limit) in enumerate(plan):
        try:
            t = trial(kind, args.out / "run", study, reference, when, limit, timeout)
        except KeyboardInterrupt:
            print(f"stopped after {len(trials)} of {len(plan)} trials (the plan is shuffled: a uniform subsample)")
            break
        if kind == "disk":
            t["kind"] = "disk (rows)" if limit < rows_top else "disk (plots)"
        trials.append(t)
        print(f"{i + 1}/{len(plan)} {t['kind']} at {t['at']:.2f} s limit {limit} exit {t['exit']} → finish "
              f"{t['finish_exit']}: {'survived' if t['survived'] else 'LOST'}"
              f"{' (traceback)' if t['traceback'] else ''} {t['stderr']}", flush=True)  # fmt: skip
    summary = {}
    for kind in ("SIGKILL", "SIGTERM", "SIGINT", "disk (rows)", "disk (plots)"):
        mine = [t for t in trials if t["kind"] == kind]
        summary[kind] = {"tried": len(mine), "survived": sum(t["survived"] for t in mine),
                         "lost": sum(not t["survived"] for t in mine), "tracebacks": sum(t["traceback"] for t in mine)}  # fmt: skip
    print(f"\nuninterrupted run: {wall:.1f} s (instants drawn uniformly in [0, {wall:.1f}] s)")
    print(f"{'fault':<14}{'tried':>7}{'survived':>10}{'lost':>6}{'tracebacks':>12}")
    for kind, s in summary.items():
        print(f"{kind:<14}{s['tried']:>7}{s['survived']:>10}{s['lost']:>6}{s['tracebacks']:>12}")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "summary": summary, "trials": trials}, indent=1))


if __name__ == "__main__":
    main()
