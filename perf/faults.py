"""Fault injection: interrupt a tiny study at uniformly random instants, finish it, compare with an uninterrupted run.

    python perf/faults.py [--trials 50] [--disk-trials 10] [--out DIR] [--seed 0] [--jobs 1] [--json FILE] [--signals ...]

The study (one untrained Fashion-MNIST AlexNet on 20 synthetic images, two layers, weight noise at
two levels, two draws: 9 cells) runs through the command line, figures and leaderboard included.
One uninterrupted run gives the reference and its CPU time T (user + system, start-up to the
leaderboard). Then, for each of SIGKILL, SIGTERM and SIGINT, ``--trials`` runs are each sent the
signal once they have used a CPU time drawn uniformly from [0, T] (start-up, evaluation and
publishing all get hit in proportion to their work; CPU time, not wall time, because on a shared
machine the wall time stretches with the load and would skew the phases) and then finished as a user would: with the command the interrupted run printed
(``lesionbench run --resume DIR``, or the same command again when nothing was written), or after a
SIGKILL with the job-script form ``lesionbench run STUDY --resume DIR``. A full disk is imitated
with RLIMIT_FSIZE (writes past the limit fail with EFBIG, as tests/test_faults.py does): a limit
below the final size of ``outcomes.arrow`` hits the rows, one between the results files and the
largest figure hits publishing; the run is then resumed with no limit.

Cheaper trials. Importing torch, torchvision, timm, matplotlib… is about 70 % of a run's CPU time. A
*zygote* process imports every module the reference run imported, once, and forks a child per
command: ``lesionbench.cli.main`` in a copy of a process that has done nothing but import. The
imports are the first T − T_f CPU seconds of a fresh run (T_f: the CPU time of a forked
uninterrupted run, whose final state must equal the reference's, else the benchmark stops): an
instant t in that span interrupts a fresh ``python -m lesionbench.cli`` process at t (start-up is
hit in proportion to its work), a later instant interrupts a forked run at t − (T − T_f). Full-disk runs and every
finishing command are forked (no fault is injected while they import). Every run has one thread
(``OMP_NUM_THREADS=1``), the reference included, so ``--jobs N`` trials (each in its own directory)
share the cores.

A trial **survives** when the finishing command exits 0 and the final ``results.csv`` (timings and
checksums aside, rows in key order), every cell's per-image outcomes and ``LEADERBOARD.md`` (its images/s
and study-time columns aside) equal the reference's; otherwise it is **lost** (its directory is
kept under ``--out``/trials). Also counted: runs that printed a Python traceback.

Resumable. Each finished trial is appended as one JSON line (fault, instant, outcome, detail, git
commit, lesionbench version) to ``--out``/trials.jsonl; running the command again with the same
``--out`` reuses the reference (when its record, study and files are intact) and runs only the
trials not in the log. Each trial's instant or limit comes from its own seeded generator, so the same
seed gives the same trials, and a larger ``--trials`` adds trials. SIGTERM stops the benchmark
(trials in flight are dropped and redone next time). The summary (tried / survived / lost per fault)
is computed from the log, printed, and written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import lesionbench  # noqa: E402
from conftest import write_fashion  # noqa: E402  (the suite's synthetic Fashion-MNIST files)
from lesionbench.store import read_results_with_outcomes  # noqa: E402

KEY = ["model", "layer", "perturbation", "level", "draw"]
FINISHED = (0, 3)  # a run that finished: 3 when its model is at chance (the random test images) and not scored
VOLATILE = ["seconds", "images_per_s"]  # wall-clock timings differ between any two runs
FAULTS = ("SIGKILL", "SIGTERM", "SIGINT", "disk (rows)", "disk (plots)")
ENV = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
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
# The reference run: `python -m lesionbench.cli ARGS` that also lists the modules it imported (the zygote's).
RECORD = """import atexit, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
runpy.run_module("lesionbench.cli", run_name="__main__", alter_sys=True)
"""
# Imports the listed modules, then forks one child per request line {"args", "stderr", "limit"}: it
# answers the child's pid, then its exit status (negative: killed by that signal) and CPU seconds.
ZYGOTE = """import importlib, json, os, resource, signal, sys
for name in open(sys.argv[1]).read().split():
    if name != "__main__" and not name.endswith(".__main__"):
        try:
            importlib.import_module(name)
        except BaseException:
            pass
from lesionbench.cli import main
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        if request["limit"]:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["limit"], request["limit"]))
        sys.argv = ["lesionbench", *request["args"]]
        sys.exit(main())
    print(pid, flush=True)
    _, status, usage = os.wait4(pid, 0)
    print(os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, flush=True)
"""


def _child(limit: int | None = None):
    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell ignores SIGINT, and children inherit it
        if limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


class Fresh:
    """``python -m lesionbench.cli ARGS`` in a new process, its stderr to a file."""

    def __init__(self, args: list[str], stderr: Path, prefix: tuple = ("-m", "lesionbench.cli")):
        with open(stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *prefix, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_child()
            )
        self.pid = self.proc.pid

    def wait(self, timeout: float | None) -> int:
        return self.proc.wait(timeout=timeout)  # raises subprocess.TimeoutExpired


class Zygote:
    """A process that has imported what a run imports and forks a ``lesionbench`` command per request."""

    def __init__(self, preload: Path, started: list | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(preload)],
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=_child(),
        )
        self.buffer = b""
        if started is not None:
            started.append(self)  # closed however the benchmark ends, even while importing
        if self.line(None) != "ready":
            raise RuntimeError("the zygote did not start")

    def line(self, timeout: float | None) -> str | None:
        end = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the zygote died")
            self.buffer += chunk
        first, self.buffer = self.buffer.split(b"\n", 1)
        return first.decode()

    def run(self, args: list[str], stderr: Path, limit: int | None = None) -> Forked:
        self.proc.stdin.write((json.dumps({"args": args, "stderr": str(stderr), "limit": limit}) + "\n").encode())
        self.proc.stdin.flush()
        return Forked(self, int(self.line(None)))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Forked:
    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid, self.code, self.cpu = zygote, pid, None, None

    def wait(self, timeout: float | None) -> int:
        if self.code is None:
            status = self.zygote.line(timeout)
            if status is None:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            code, cpu = status.split()
            self.code, self.cpu = int(code), float(cpu)
        return self.code


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_until_cpu(proc, seconds: float) -> int | None:
    """Wait until ``proc`` has used ``seconds`` of CPU (None) or has ended first (its exit status).

    The instants are CPU time, not wall time: on a shared machine a run's wall time stretches with
    the load, its CPU time hardly does, so each phase is hit in proportion to its own work."""
    while True:
        try:
            return proc.wait(0.01)
        except subprocess.TimeoutExpired:
            used = cpu_seconds(proc.pid)
            if used is not None and used >= seconds:
                return None


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


def finish_args(run: Path, study: Path, stderr: str) -> list[str]:
    """The command an interrupted run printed (else the job-script form ``run STUDY --resume DIR``)."""
    hint = re.search(r"(?:finish it with: |start it again with: |finish with )lesionbench (.+)$", stderr.strip())
    return shlex.split(hint.group(1)) if hint else ["run", str(study), "--resume", str(run)]


def _wait(proc, timeout: float) -> tuple[int, bool]:
    """The exit status; a run still going after ``timeout`` is killed (a hang: the trial is lost)."""
    try:
        return proc.wait(timeout), False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(None), True


def trial(plan: dict, where: Path, study: Path, reference: tuple, record: dict, zygote: Zygote, live: set) -> dict:
    """One fault and its finish, in ``where``; the log entry's outcome and detail."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    run, kind, when, limit, timeout = where / "run", plan["fault"], plan["at"], plan["limit"], record["timeout_s"]
    args = ["run", str(study), "--out", str(run)]
    forked = kind.startswith("disk") or when >= record["import_cpu_s"]
    proc = zygote.run(args, where / "interrupted.err", limit) if forked else Fresh(args, where / "interrupted.err")
    live.add(proc.pid)
    first, hit, hung = None, False, False
    if not kind.startswith("disk"):
        first = run_until_cpu(proc, when - record["import_cpu_s"] if forked else when)  # None: the instant came
        if first is None:
            try:
                os.kill(proc.pid, getattr(signal, kind))
                hit = True
            except ProcessLookupError:  # it ended just now (and the zygote reaped it)
                pass
    if first is None:
        first, hung = _wait(proc, timeout)
    live.discard(proc.pid)
    err = (where / "interrupted.err").read_text()
    finishing = zygote.run(finish_args(run, study, err), where / "finish.err")
    live.add(finishing.pid)
    rc, hung2 = _wait(finishing, timeout)
    live.discard(finishing.pid)
    err2 = (where / "finish.err").read_text()
    try:
        same = rc in FINISHED and not hung and not hung2 and state(run) == reference
    except Exception as exc:  # a final state that cannot even be read back is lost
        same, err2 = False, f"{err2}\n{exc}"
    if same:
        shutil.rmtree(where)
    detail = {
        "mode": "forked" if forked else "fresh",
        "hit": hit,
        "exit": first,
        "finish_exit": rc,
        "hung": hung or hung2,
        "traceback": "Traceback" in err,
        "finish_traceback": "Traceback" in err2,
        "stderr": err.strip().splitlines()[-1:],
        "finish_stderr": err2.strip()[-300:],
    }
    return {"outcome": "survived" if same else "lost", "detail": detail}


def commit() -> str:
    """HEAD, with ``-dirty`` when the package's sources differ from it."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "benchmark", "plugins", "models"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("-dirty" if dirty else "")


def prepare_reference(out: Path, study: Path) -> tuple[dict, tuple]:
    """The reference run and its record (reused when intact), and a forked run that must equal it."""
    path, ref, forked = out / "reference.json", out / "reference", out / "reference-forked"
    try:
        record = json.loads(path.read_text())
        if record["study"] != study.read_text() or "cpu_s" not in record:
            raise ValueError("another study")
        reference = state(ref)
        print(f"reference reused: {out / 'reference.json'} (lesionbench {record['version']}, {record['commit']})")
        return record, reference
    except Exception:
        pass
    for p in (path, ref, forked, out / "preload.txt"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if (out / "trials.jsonl").is_file():  # trials against another reference (other instants): kept aside
        (out / "trials.jsonl").rename(out / f"trials-{time.strftime('%Y%m%dT%H%M%S')}.jsonl")
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    rc, _ = _wait(
        Fresh(
            [str(out / "preload.txt"), "run", str(study), "--out", str(ref)],
            out / "reference.err",
            prefix=("-c", RECORD),
        ),
        3600,
    )
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if rc not in FINISHED:
        sys.exit(f"the reference run failed: {(out / 'reference.err').read_text()}")
    reference = state(ref)
    zygote = Zygote(out / "preload.txt")
    try:
        start = time.perf_counter()
        child = zygote.run(["run", str(study), "--out", str(forked)], out / "reference-forked.err")
        rc, _ = _wait(child, 3600)
        forked_wall, forked_cpu = time.perf_counter() - start, child.cpu
    finally:
        zygote.close()
    if rc not in FINISHED or state(forked) != reference:
        sys.exit(f"a forked run does not equal a fresh one: {(out / 'reference-forked.err').read_text()[-2000:]}")
    sizes = {p.name: p.stat().st_size for p in ref.rglob("*") if p.is_file()}
    record = {
        "wall_s": wall,
        "forked_wall_s": forked_wall,
        "cpu_s": cpu,
        "forked_cpu_s": forked_cpu,
        "import_cpu_s": max(0.0, cpu - forked_cpu),
        "timeout_s": max(600.0, 20 * wall),
        "sizes": sizes,
        "study": study.read_text(),
        "commit": commit(),
        "version": lesionbench.__version__,
    }
    path.write_text(json.dumps(record, indent=1))
    return record, reference


def make_plan(args, record: dict) -> list[dict]:
    """Every trial: its fault, its instant (uniform in [0, T]) or file-size limit, each from its own generator."""
    sizes = record["sizes"]
    rows_top = sizes["outcomes.arrow"]
    files = max(sizes["results.csv"], rows_top, sizes["manifest.json"])
    largest = max(s for n, s in sizes.items() if n.endswith(".png"))
    plan = []
    for kind in (k for k in args.signals.split(",") if k):
        for i in range(args.trials):
            rng = random.Random(f"{args.seed}:{kind}:{i}")
            plan.append(
                {"id": f"{kind}#{i}", "fault": kind, "at": round(rng.uniform(0, record["cpu_s"]), 3), "limit": None}
            )
    for kind, low, high in (("disk (rows)", 600, rows_top), ("disk (plots)", files + 1, largest)):
        for i in range(args.disk_trials):
            rng = random.Random(f"{args.seed}:{kind}:{i}")
            plan.append({"id": f"{kind}#{i}", "fault": kind, "at": 0.0, "limit": rng.randrange(low, high)})
    random.Random(args.seed).shuffle(plan)  # the machine's load drifts: spread it over every kind of fault
    return plan


def read_log(path: Path, plan: list[dict]) -> dict[str, dict]:
    """The trials of ``plan`` logged so far, by id (a torn last line, from a kill mid-write, is ignored)."""
    wanted = {p["id"]: (p["at"], p["limit"]) for p in plan}
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if wanted.get(entry.get("id")) == (entry.get("at"), entry.get("limit")):
                done[entry["id"]] = entry
    return done


def summarise(plan: list[dict], done: dict[str, dict], record: dict) -> dict:
    summary = {}
    for kind in FAULTS:
        mine = [done[p["id"]] for p in plan if p["fault"] == kind and p["id"] in done]
        summary[kind] = {
            "tried": len(mine),
            "survived": sum(t["outcome"] == "survived" for t in mine),
            "lost": sum(t["outcome"] != "survived" for t in mine),
            "hit": sum(t["detail"]["hit"] or kind.startswith("disk") for t in mine),
            "tracebacks": sum(t["detail"]["traceback"] or t["detail"]["finish_traceback"] for t in mine),
        }
    print(
        f"\nuninterrupted run: {record['cpu_s']:.1f} CPU s ({record['wall_s']:.1f} s wall), of which start-up "
        f"imports {record['import_cpu_s']:.1f} CPU s (instants drawn uniformly in [0, {record['cpu_s']:.1f}] CPU s)"
    )
    print(f"{'fault':<14}{'tried':>7}{'survived':>10}{'lost':>6}{'hit':>6}{'tracebacks':>12}")
    for kind, s in summary.items():
        print(f"{kind:<14}{s['tried']:>7}{s['survived']:>10}{s['lost']:>6}{s['hit']:>6}{s['tracebacks']:>12}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="trials per signal (default: 50)")
    parser.add_argument(
        "--disk-trials", type=int, default=10, help="full-disk trials, rows and plots each (default: 10)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/faults"),
        help="work directory; the same again resumes its trial log (default: runs/faults)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the instants and limits (default: 0)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="trials run at once, each in its own directory (default: 1)"
    )
    parser.add_argument("--json", type=Path, help="write the summary and every trial here")
    parser.add_argument(
        "--signals",
        default="SIGKILL,SIGTERM,SIGINT",
        help="comma-separated signals to try (default: SIGKILL,SIGTERM,SIGINT)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    if not data.is_dir():
        write_fashion(data, n=40)
    study = args.out / "study.toml"
    study.write_text(STUDY.format(data=data.resolve()))
    record, reference = prepare_reference(args.out, study)
    print(
        f"reference: {len(reference[0].splitlines()) - 1} rows in {record['cpu_s']:.1f} CPU s, {record['wall_s']:.1f} s "
        f"wall (forked: {record['forked_cpu_s']:.1f} CPU s); outcomes.arrow {record['sizes']['outcomes.arrow']} B",
        flush=True,
    )
    plan = make_plan(args, record)
    log_path = args.out / "trials.jsonl"
    done = read_log(log_path, plan)
    todo = [p for p in plan if p["id"] not in done]
    print(f"{len(plan) - len(todo)} of {len(plan)} trials already in {log_path}; {len(todo)} to run", flush=True)
    version, head = lesionbench.__version__, commit()
    lock, local, zygotes, live, stopping = threading.Lock(), threading.local(), [], set(), threading.Event()

    def work(p: dict) -> dict | None:
        if stopping.is_set():
            return None
        if not hasattr(local, "zygote"):
            local.zygote = Zygote(args.out / "preload.txt", zygotes)
        slot = re.sub(r"\W+", "-", p["id"])
        result = trial(p, args.out / "trials" / slot, study, reference, record, local.zygote, live)
        if stopping.is_set():
            return None
        entry = {
            "id": p["id"],
            "fault": p["fault"],
            "at": p["at"],
            "limit": p["limit"],
            **result,
            "commit": head,
            "lesionbench": version,
        }
        with lock, open(log_path, "a") as log:
            log.write(json.dumps(entry) + "\n")
            log.flush()
            os.fsync(log.fileno())
        return entry

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # stopped early (a deadline): the trials logged so far are summarised
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    count = len(plan) - len(todo)
    try:
        for future in as_completed([pool.submit(work, p) for p in todo]):
            t = future.result()
            if t is None:
                continue
            count += 1
            d = t["detail"]
            print(
                f"{count}/{len(plan)} {t['id']} at {t['at']:.2f} CPU s ({d['mode']}) limit {t['limit']} exit {d['exit']} "
                f"→ finish {d['finish_exit']}: {t['outcome'].upper() if t['outcome'] == 'lost' else t['outcome']}"
                f"{' (traceback)' if d['traceback'] or d['finish_traceback'] else ''} {d['stderr']}",
                flush=True,
            )
    except KeyboardInterrupt:
        stopping.set()
        print("stopped: the trials in flight are dropped; the same command runs the rest", flush=True)
        pool.shutdown(wait=False, cancel_futures=True)
        for pid in list(live):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        pool.shutdown(wait=not stopping.is_set())
        for z in zygotes:
            z.close()
    done = read_log(log_path, plan)
    summary = summarise(plan, done, record)
    if args.json:
        trials = [done[p["id"]] for p in plan if p["id"] in done]
        args.json.write_text(
            json.dumps(
                {
                    "cpu_s": record["cpu_s"],
                    "import_cpu_s": record["import_cpu_s"],
                    "summary": summary,
                    "trials": trials,
                },
                indent=1,
            )
        )
    if stopping.is_set():
        os._exit(143)  # worker threads still waiting on killed runs are not joined


if __name__ == "__main__":
    main()
