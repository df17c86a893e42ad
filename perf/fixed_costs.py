"""Where a demo-sized run's CPU time goes: imports, the study, publishing; and damaging a large layer.

    python perf/fixed_costs.py [--out runs/fixed-costs] [--run-args '--n-images 20 ...'] [--repeat 3]
                               [--damage-size 37748736]

First, in a separate interpreter, ``lesionbench run demo --no-publish`` is run once to learn every
module a run imports (torch, the plugins, and whatever the model, the data and the summary load
lazily). Then, in each of ``--repeat`` fresh processes, CPU time (``time.process_time``, all
threads) of the three parts below; the table shows each part's median over the processes (CPU time
only grows when other jobs compete for the cores, so medians of fresh processes are what a shared
machine can give):

1. **imports**: every one of those modules, in the order the run imported them; so the study
   that follows imports nothing, and an import made lazily inside the study (scipy for an interval,
   torchvision for a preprocessing) is counted here, not hidden in the study;
2. **the study**: ``lesionbench run demo --no-publish`` (the cells, the model and data loading, its
   summary table);
3. **publishing**: what ``lesionbench run`` does after the rows, once: the Markdown leaderboard with
   its bootstrap intervals and the figures (matplotlib's import included). Publishing without the
   figures is timed afterwards, apart (``--no-plots``), and left out of the shares.

The shares are of imports + study + publishing. As a check, the same ``lesionbench run demo``
(publishing included) is also run end to end in its own interpreter, once per repeat, and its CPU
time (user + system of the child, ``resource.getrusage``) printed beside the sum.

Then the CPU time per cell of damaging a tensor the size of AlexNet's fc6 (37.7M weights) with
each of the paper's perturbations at level 0.5 — apply and restore, as every cell (and, in a
sharded study, every shard of a cell) pays it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECORD = """
import json, sys
from lesionbench.cli import main
code = main({argv!r})
json.dump({{"code": code, "modules": list(sys.modules)}}, open({path!r}, "w"))
"""


def modules_a_run_imports(run_argv: list[str], scratch: Path) -> list[str]:
    """The names in ``sys.modules`` after ``lesionbench <run_argv>`` in a fresh interpreter, in import order."""
    record = scratch / "modules.json"
    script = RECORD.format(argv=run_argv, path=str(record))
    subprocess.run([sys.executable, "-c", script], check=True, stdout=subprocess.DEVNULL)
    found = json.loads(record.read_text())
    assert found["code"] in (0, 3), found["code"]  # 3: not scored
    return found["modules"]


def end_to_end_cpu(run_argv: list[str]) -> float:
    """User + system CPU seconds of ``python -m lesionbench.cli <run_argv>`` in its own process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "lesionbench.cli", *run_argv], check=False, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_all(names: list[str]) -> None:
    """Import each not-yet-imported module of ``names`` in order."""
    for name in names:
        if name in sys.modules or name == "__main__":
            continue
        try:
            importlib.import_module(name)
        except Exception:  # a module only its parent may import (a platform shim, a lazy alias): skip
            pass


HEAVY = ("torchvision", "timm", "scipy", "sympy", "matplotlib")
PARTS = ("imports", "study", "publishing")
LABELS = {
    "imports": "imports (every module the run loads)",
    "study": "the study (run --no-publish)",
    "publishing": "publishing (leaderboard and figures)",
}


def measure_once(names: list[str], run_argv: list[str], out: Path) -> dict:
    """One fresh process's CPU seconds per part (this is called in a child: imports count once)."""
    spent = {}
    t = time.process_time()
    from lesionbench.cli import main as cli
    from lesionbench.publish import publish

    import_all(names)
    spent["imports"] = time.process_time() - t
    t = time.process_time()
    assert cli([*run_argv, "--out", str(out)]) in (0, 3)  # 3: not scored
    spent["study"] = time.process_time() - t
    spent["late"] = [m for m in HEAVY if m in sys.modules and m not in names]
    t = time.process_time()
    publish([out / "results.csv"], out / "LEADERBOARD.md", draw=True)
    spent["publishing"] = time.process_time() - t
    t = time.process_time()
    publish([out / "results.csv"], out / "LEADERBOARD-no-plots.md", draw=False)
    spent["leaderboard"] = time.process_time() - t
    return spent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fixed-costs"))
    parser.add_argument("--run-args", default="", help="further `lesionbench run` flags (smaller runs)")
    parser.add_argument("--damage-size", type=int, default=4096 * 9216, help="weights of the damaged layer")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes measured; the medians are shown")
    parser.add_argument("--once", type=Path, help=argparse.SUPPRESS)  # internal: measure in this process
    args = parser.parse_args(argv)
    run_argv = ["run", "demo", "--no-publish", *args.run_args.split()]
    if args.once:
        names = json.loads((args.out / "modules.json").read_text())["modules"]
        args.once.write_text(json.dumps(measure_once(names, run_argv, args.out / args.once.stem)))
        return
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    names = modules_a_run_imports([*run_argv, "--out", str(args.out / "record")], args.out)
    trials, wholes = [], []
    for i in range(args.repeat):
        record = args.out / f"trial{i}.json"
        subprocess.run(
            [sys.executable, __file__, "--out", str(args.out), "--run-args", args.run_args, "--once", str(record)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        trials.append(json.loads(record.read_text()))
        wholes.append(
            end_to_end_cpu([*[a for a in run_argv if a != "--no-publish"], "--out", str(args.out / f"whole{i}")])
        )
    med = {part: statistics.median(t[part] for t in trials) for part in (*PARTS, "leaderboard")}
    total = sum(med[part] for part in PARTS)
    heavy = [m for m in HEAVY if m in names]
    late = sorted({m for t in trials for m in t["late"]})
    print(
        f"\n{args.repeat} fresh processes, medians. Of {', '.join(HEAVY)} the study loads: "
        f"{', '.join(heavy) or 'none'}; imported during the study anyway: {', '.join(late) or 'none'}\n"
    )
    print("| part | CPU seconds | share |\n|---|---|---|")
    for part in PARTS:
        print(f"| {LABELS[part]} | {med[part]:.1f} | {med[part] / total:.0%} |")
    fixed = med["imports"] + med["publishing"]
    print(f"| **imports + publishing** | **{fixed:.1f}** | **{fixed / total:.0%}** |")
    print(f"| (publishing with `--no-plots`: the leaderboard alone, timed apart) | {med['leaderboard']:.1f} | |")
    light = med["imports"] + med["leaderboard"]
    print(
        f"\nthe same run with `--no-plots`: imports + publishing {light:.1f} CPU s, "
        f"{light / (light + med['study']):.0%} of its CPU time"
    )
    print(
        f"\nthe same run end to end, each in its own process (publishing included): median "
        f"{statistics.median(wholes):.1f} CPU s (sum of the medians above: {total:.1f}; all: "
        f"{', '.join(f'{w:.1f}' for w in wholes)})"
    )
    print(
        "per process, imports / study / publishing: "
        + "; ".join(" / ".join(f"{t[p]:.1f}" for p in PARTS) for t in trials)
    )

    from torch import nn

    from lesionbench.layers import Layer
    from lesionbench.perturbation import Snapshot, generator_for, perturbed
    from lesionbench.registry import get_registry

    linear = nn.Linear(max(1, args.damage_size // 4096), 4096)
    layer = Layer("fc", "fc", 0, 1.0, "linear", linear)
    registry = get_registry()
    print(f"\n| damage of a {linear.weight.numel():,}-weight layer, level 0.5 | CPU seconds per cell |\n|---|---|")
    saved = Snapshot(layer)
    for name in ("synapse_knockout", "node_knockout", "weight_noise"):
        perturbation = registry.get("perturbations", name)
        t = time.process_time()
        for draw in range(3):
            with perturbed(
                layer, perturbation, 0.5 if name != "weight_noise" else 1.0, generator_for(draw), saved=saved
            ):
                pass
        print(f"| {name} | {(time.process_time() - t) / 3:.3f} |")


if __name__ == "__main__":
    main()
