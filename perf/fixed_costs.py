"""Where a demo-sized run's CPU time goes: imports, the study, publishing; and damaging a large layer.

    python perf/fixed_costs.py [--out runs/fixed-costs] [--run-args '--n-images 20 ...'] [--damage-size 37748736]

In one process, CPU time (``time.process_time``, all threads) of:

1. the imports ``lesionbench run`` needs (the command line, the harness, every built-in plugin);
2. ``lesionbench run demo --no-publish`` (the study and its summary table; which of scipy and
   matplotlib it loaded is printed);
3. publishing it afterwards, as ``lesionbench leaderboard`` does: the Markdown leaderboard with
   its bootstrap intervals, then the figures (the imports of scipy and matplotlib counted here).

Then the CPU time per cell of damaging a tensor the size of AlexNet's fc6 (37.7M weights) with
each of the paper's perturbations at level 0.5 — apply and restore, as every cell (and, in a
sharded study, every shard of a cell) pays it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fixed-costs"))
    parser.add_argument("--run-args", default="", help="further `lesionbench run` flags (smaller runs)")
    parser.add_argument("--damage-size", type=int, default=4096 * 9216, help="weights of the damaged layer")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    spent = {}
    t = time.process_time()
    from lesionbench.cli import main as cli
    from lesionbench.publish import publish
    from lesionbench.registry import get_registry

    get_registry()
    import lesionbench.api  # noqa: F401
    import lesionbench.executors.local  # noqa: F401

    spent["imports"] = time.process_time() - t
    t = time.process_time()
    assert cli(["run", "demo", "--out", str(args.out), "--no-publish", *args.run_args.split()]) in (
        0,
        3,
    )  # 3: not scored
    spent["study (run --no-publish)"] = time.process_time() - t
    loaded = [m for m in ("scipy", "matplotlib") if m in sys.modules]
    t = time.process_time()
    publish([args.out / "results.csv"], args.out / "LEADERBOARD.md", draw=False)
    spent["publishing: leaderboard"] = time.process_time() - t
    t = time.process_time()
    publish([args.out / "results.csv"], args.out / "LEADERBOARD.md", draw=True)
    spent["publishing: leaderboard again, with figures"] = time.process_time() - t
    total = sum(spent.values())
    print(f"\nscipy/matplotlib loaded by the study itself: {', '.join(loaded) or 'neither'}\n")
    print("| part | CPU seconds | share |\n|---|---|---|")
    for part, seconds in spent.items():
        print(f"| {part} | {seconds:.1f} | {seconds / total:.0%} |")
    fixed = total - spent["study (run --no-publish)"]
    print(f"| **imports + publishing** | **{fixed:.1f}** | **{fixed / total:.0%}** |")
    print(
        f"| imports alone, with `--no-publish` | {spent['imports']:.1f} | "
        f"{spent['imports'] / (spent['imports'] + spent['study (run --no-publish)']):.0%} |"
    )

    from torch import nn

    from lesionbench.layers import Layer
    from lesionbench.perturbation import Snapshot, generator_for, perturbed

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
