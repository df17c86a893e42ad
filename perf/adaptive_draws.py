"""Adaptive draws against fixed 5 and 20 draws on the demo: cells spent and interval widths reached.

    python perf/adaptive_draws.py [--out runs/adaptive-demo] [--target-ci 0.02] [--max-draws 20] [--threads N]
                                         [--levels 0,0.25,0.5,0.75]

Runs the demo study once with 20 draws per level (``lesionbench run demo --draws 20``; reused if
``--out`` already holds it). Draw k of a layer × level is the same cell — same seed, same result —
whether a study asks for 5 draws, 20, or adds draws adaptively, so the three strategies are read
off that one run exactly: fixed 5 = draws 0–4; fixed 20 = all; adaptive = draws 0–4, then the
draws :meth:`lesionbench.plan.Plan.extra_cells` asks for (the same rule a study with
``target_ci``/``max_draws`` applies), round by round. tests/test_adaptive.py checks that an adaptive
run's rows are those of a fixed run.

Prints a Markdown table: cells evaluated, and over every layer × perturbation × level with random
draws the width of the 95% t-interval of its mean accuracy (2·t·s/√n: median, 90th percentile,
largest) and the share under the target.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

import lesionbench
from lesionbench.plan import extra_draws
from lesionbench.store import CLEAN


def width(values: np.ndarray) -> float:
    n = len(values)
    return 2 * stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n) if n > 1 else 0.0


def strategies(df: pd.DataFrame, target: float, cap: int, first: int = 5) -> pd.DataFrame:
    cells = df[df["perturbation"] != CLEAN]
    rows = []
    for _cell, g in cells.groupby(["layer", "perturbation", "level"]):
        v = g.sort_values("draw")["top1"].to_numpy()
        if len(v) == 1:  # identity level / deterministic: one cell whatever the strategy
            rows += [dict(strategy=s, cells=1, width=np.nan) for s in ("fixed 5", "fixed 20", "adaptive")]
            continue
        n = first
        while (add := extra_draws(list(v[:n]), target, cap)) > 0:
            n += add
        rows += [
            dict(strategy="fixed 5", cells=first, width=width(v[:first])),
            dict(strategy="fixed 20", cells=len(v), width=width(v)),
            dict(strategy="adaptive", cells=n, width=width(v[:n])),
        ]
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/adaptive-demo"))
    parser.add_argument("--target-ci", type=float, default=0.02)
    parser.add_argument("--max-draws", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--levels", help="comma-separated levels for every perturbation (default: the demo's own)")
    parser.add_argument("--n-images", type=int, help="evaluation images (default: the demo's; small for a smoke test)")
    parser.add_argument("--data", help="Fashion-MNIST folder (default: the demo's)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if (args.out / "results.csv").is_file():
        df = lesionbench.load_results(args.out)
    else:
        levels = [float(v) for v in args.levels.split(",")] if args.levels else None
        extra = {k: v for k, v in (("n_images", args.n_images), ("data", args.data)) if v is not None}
        df = lesionbench.run("demo", out=args.out, draws=args.max_draws, levels=levels, **extra)
    seconds = time.perf_counter() - started
    s = strategies(df, args.target_ci, args.max_draws)
    table = []
    for name in ("fixed 5", "fixed 20", "adaptive"):
        g = s[s["strategy"] == name]
        w = g["width"].dropna()
        table.append(
            {
                "strategy": name
                + (f" (target_ci {args.target_ci:g}, max {args.max_draws})" if name == "adaptive" else ""),
                "cells": int(g["cells"].sum()) + df["model"].nunique(),  # + the clean evaluation
                "median width": f"{w.median():.4f}",
                "90th pct": f"{w.quantile(0.9):.4f}",
                "largest": f"{w.max():.4f}",
                f"levels under {args.target_ci:g}": f"{(w < args.target_ci).mean():.0%}",
            }
        )
    print(f"demo with {args.max_draws} draws: {len(df)} rows ({seconds:.0f} s for this script)\n")
    print(pd.DataFrame(table).to_markdown(index=False, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
