"""Calibration table of the bootstrap's 95% intervals against a known truth (lesionbench.calibration).

For 10 and 1,000 classes, 1–5 draws and a small and a realistic draw spread: how often the
intervals of the fragile / middle / robust layer scores, of the overall score and of a difference
of two layers hold the truth, and how often two equal models get different ranks or two equal
layers are called different. Prints a Markdown table, one line at a time as each row is done.

    nice python perf/calibration.py [--studies 200] [--replicates 400]
"""

from __future__ import annotations

import argparse
import sys

from lesionbench.calibration import SPREADS, run

COLUMNS = [
    "cover_fragile",
    "cover_middle",
    "cover_robust",
    "cover_overall",
    "cover_difference",
    "equal_models_split",
    "equal_layers_split",
    "gate_false_alarm",
    "noisy_cells",
    "largest_gap",
    "withheld",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--replicates", type=int, default=400)
    parser.add_argument("--draws", type=int, nargs="+", default=[2, 3, 5, 1])
    parser.add_argument("--spreads", nargs="+", default=["realistic", "small"], choices=list(SPREADS))
    args = parser.parse_args()
    print(f"{args.studies} simulated studies per row, 500 images, {args.replicates} bootstrap replicates\n")
    print(
        "| classes | spread | draws | "
        + " | ".join(c.replace("cover_", "cover ").replace("_", " ") for c in COLUMNS)
        + " |"
    )
    print("|" + "---|" * (3 + len(COLUMNS)))
    for spread_name in args.spreads:
        spread = SPREADS[spread_name]
        for draws in args.draws:
            for classes in (1000, 10):
                r = run(classes, draws, spread, studies=args.studies, replicates=args.replicates)
                cells = [f"{r[c]:.3f}" for c in COLUMNS]
                print(f"| {classes} | {spread_name} ({spread}) | {draws} | " + " | ".join(cells) + " |", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
