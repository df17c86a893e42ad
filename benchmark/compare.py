"""The CI regression gate: compare the layer scores of a new results table with a baseline's.

Cells are matched on model, dataset, layer and perturbation; a layer score or a clean accuracy
that drops by more than ``max_drop`` (absolute) is a regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from lesionbench.errors import LesionbenchError
from lesionbench.leaderboard import md
from lesionbench.scores import clean_accuracy, layer_scores

KEYS = ["model", "dataset", "layer", "perturbation"]


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per matched quantity: what, new, baseline, delta, regression
    only_new: list[str]
    only_baseline: list[str]

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["regression"]]


def compare(new: pd.DataFrame, baseline: pd.DataFrame, max_drop: float = 0.05, metric: str = "top1") -> Comparison:
    if not math.isfinite(max_drop) or max_drop < 0:
        raise LesionbenchError(f"--max-drop must be a non-negative number, got {max_drop}")
    ns, bs = layer_scores(new, metric), layer_scores(baseline, metric)
    merged = ns.merge(bs, on=KEYS, suffixes=("_new", "_base"), how="outer", indicator=True)
    both = merged[merged["_merge"] == "both"]
    if both.empty:
        raise LesionbenchError("the two results tables share no model × layer × perturbation to compare")
    rows = [
        dict(model=r.model, dataset=r.dataset, what=f"{r.layer} · {r.perturbation} score",
             new=r.score_new, baseline=r.score_base)  # fmt: skip
        for r in both.itertuples()
    ]
    cn, cb = clean_accuracy(new, "top1"), clean_accuracy(baseline, "top1")
    cn5, cb5 = clean_accuracy(new, "top5"), clean_accuracy(baseline, "top5")
    for label, a, b in (("clean top-1", cn, cb), ("clean top-5", cn5, cb5)):
        for r in a.merge(b, on=["model", "dataset"], suffixes=("_new", "_base")).itertuples():
            rows.append(dict(model=r.model, dataset=r.dataset, what=label, new=r.clean_new, baseline=r.clean_base))
    table = pd.DataFrame(rows)
    table["delta"] = table["new"] - table["baseline"]
    table["regression"] = table["delta"] < -max_drop - 1e-12
    label = lambda df: sorted(f"{r.model} {r.layer} {r.perturbation}" for r in df.itertuples())  # noqa: E731
    return Comparison(
        table=table,
        only_new=label(merged[merged["_merge"] == "left_only"]),
        only_baseline=label(merged[merged["_merge"] == "right_only"]),
    )


def to_markdown(c: Comparison, max_drop: float, show_all: bool = False) -> str:
    shown = c.table if show_all else c.table[(c.table["delta"].abs() > 1e-9) | c.table["regression"]]
    lines = [
        f"### lesionbench compare (max drop {max_drop:g})",
        "",
        f"{len(c.table)} quantities compared, {int(c.table['regression'].sum())} regressions.",
        "",
    ]
    if not shown.empty:
        lines += ["| model | dataset | quantity | baseline | new | Δ | |", "|---|---|---|---|---|---|---|"]
        for r in shown.sort_values("delta").itertuples():
            flag = "❌ regression" if r.regression else ("⬆" if r.delta > 0 else "")
            lines.append(
                f"| {md(r.model)} | {md(r.dataset)} | {md(r.what)} | {r.baseline:.3f} | {r.new:.3f} | {r.delta:+.3f} | {flag} |"
            )
        lines.append("")
    if c.only_new:
        lines.append(f"Only in new: {', '.join(md(x) for x in c.only_new)}")
    if c.only_baseline:
        lines.append(f"Only in baseline: {', '.join(md(x) for x in c.only_baseline)}")
    return "\n".join(lines).rstrip() + "\n"
