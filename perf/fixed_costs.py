"""Where a demo-sized run's CPU time goes: imports, the study, publishing; and damaging a large layer.

    python perf/fixed_costs.py [--out runs/fixed-costs] [--run-args '--n-images 20 ...'] [--damage-size 37748736]

First, in a separate interpreter, ``lesionbench run demo --no-publish`` is run once to learn every
module a run imports (torch, the plugins, and whatever the model, the data and the summary load
lazily). Then, in one fresh process, CPU time (``time.process_time``, all threads) of:

1. **imports**: every one of those modules, in the order the run imported them; so the study
   that follows imports nothing, and an import made lazily inside the study (scipy for an interval,
   torchvision for a preprocessing) is counted here, not hidden in the study;
2. **the study**: ``lesionbench run demo --no-publish`` (the cells, the model and data loading, its
   summary table);
3. **publishing**: what ``lesionbench run`` does after the rows, once: the Markdown leaderboard with
   its bootstrap intervals and the figures (matplotlib's import included). Publishing without the
   figures is timed afterwards, apart (``--no-plots``), and left out of the shares.

The shares are of imports + study + publishing. As a check, the same ``lesionbench run demo``
(publishing included) is also run end to end in its own interpreter and its CPU time (user + system
of the child, ``resource.getrusage``) printed beside the sum.

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


def import_all(names: list[str]) -> int:
    """Import each not-yet-imported module of ``names`` in order; the count that imported."""
    done = 0
    for name in names:
        if name in sys.modules or name == "__main__":
            continue
        try:
            importlib.import_module(name)
            done += 1
        except Exception:  # a module only its parent may import (a platform shim, a lazy alias): skip
            pass
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fixed-costs"))
    parser.add_argument("--run-args", default="", help="further `lesionbench run` flags (smaller runs)")
    parser.add_argument("--damage-size", type=int, default=4096 * 9216, help="weights of the damaged layer")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    run_argv = ["run", "demo", "--no-publish", *args.run_args.split()]
    names = modules_a_run_imports([*run_argv, "--out", str(args.out / "record")], args.out)

    spent = {}
    t = time.process_time()
    from lesionbench.cli import main as cli
    from lesionbench.publish import publish

    count = import_all(names)
    spent["imports (every module the run loads)"] = time.process_time() - t
    t = time.process_time()
    run_dir = args.out / "run"
    assert cli([*run_argv, "--out", str(run_dir)]) in (0, 3)  # 3: not scored
    spent["the study (run --no-publish)"] = time.process_time() - t
    late = [m for m in ("torchvision", "timm", "scipy", "matplotlib") if m in sys.modules and m not in names]
    t = time.process_time()
    publish([run_dir / "results.csv"], run_dir / "LEADERBOARD.md", draw=True)
    spent["publishing (leaderboard and figures)"] = time.process_time() - t
    t = time.process_time()
    publish([run_dir / "results.csv"], run_dir / "LEADERBOARD-no-plots.md", draw=False)
    leaderboard_only = time.process_time() - t

    total = sum(spent.values())
    heavy = [m for m in ("torchvision", "timm", "scipy", "matplotlib") if m in names]
    print(
        f"\n{count} modules imported up front; of torchvision, timm, scipy, matplotlib the study loads: "
        f"{', '.join(heavy) or 'none'}; imported during the study anyway: {', '.join(late) or 'none'}\n"
    )
    print("| part | CPU seconds | share |\n|---|---|---|")
    for part, seconds in spent.items():
        print(f"| {part} | {seconds:.1f} | {seconds / total:.0%} |")
    fixed = total - spent["the study (run --no-publish)"]
    print(f"| **imports + publishing** | **{fixed:.1f}** | **{fixed / total:.0%}** |")
    print(f"| (publishing with `--no-plots`: the leaderboard alone, timed apart) | {leaderboard_only:.1f} | |")
    whole = end_to_end_cpu([*[a for a in run_argv if a != "--no-publish"], "--out", str(args.out / "whole")])
    print(
        f"\nthe same run end to end in its own process (publishing included): {whole:.1f} CPU s "
        f"(sum of the parts above: {total:.1f})"
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
