"""The CI regression gate: compare the layer scores of a new results table with a baseline's.

Cells are matched on model, dataset, layer and perturbation; a layer score or a clean accuracy
that drops by more than ``max_drop`` (absolute) is a regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    # the same, summarised per model and perturbation; and where the two runs are not alike
    only_new_summary: list[str] = field(default_factory=list)
    only_baseline_summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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
    left, right = merged[merged["_merge"] == "left_only"], merged[merged["_merge"] == "right_only"]
    return Comparison(
        table=table,
        only_new=label(left),
        only_baseline=label(right),
        only_new_summary=summarise_missing(left, bs),
        only_baseline_summary=summarise_missing(right, ns),
        warnings=differences(new, baseline),
    )


def summarise_missing(missing: pd.DataFrame, other: pd.DataFrame, most: int = 6) -> list[str]:
    """One line per model of the layer × perturbation scores that only one side has: a model or a
    perturbation the other side did not run is named once, not layer by layer."""
    lines = []
    for model, g in missing.groupby("model", sort=True):
        mine = other[other["model"] == model]
        if mine.empty:
            lines.append(f"{model}: not run ({len(g)} layer scores)")
            continue
        parts = []
        for pert, pg in g.groupby("perturbation", sort=True):
            if not (mine["perturbation"] == pert).any():
                parts.append(f"{pert} (all {len(pg)} layers)")
            else:
                layers = sorted(pg["layer"])
                shown = ", ".join(layers[:most]) + (f" and {len(layers) - most} more" if len(layers) > most else "")
                parts.append(f"{pert}: {shown}")
        lines.append(f"{model}: " + "; ".join(parts))
    return lines


def differences(new: pd.DataFrame, baseline: pd.DataFrame) -> list[str]:
    """Where the runs behind the two tables differ in images, levels or draws, per model (and
    perturbation): their scores are then not measured alike, and a difference may be no change."""
    out = []

    def images(df: pd.DataFrame) -> pd.Series:
        return df[df["perturbation"] == "clean"].groupby("model")["n_images"].max()

    def grid(df: pd.DataFrame) -> pd.DataFrame:
        cells = df[df["perturbation"] != "clean"]
        per_level = cells.groupby(["model", "perturbation", "level"])["draw"].nunique().reset_index()
        return per_level.groupby(["model", "perturbation"]).agg(levels=("level", tuple), draws=("draw", "max"))

    ni, bi = images(new), images(baseline)
    for model in sorted(set(ni.index) & set(bi.index)):
        if ni[model] != bi[model]:
            out.append(f"{model}: {ni[model]:g} images in new, {bi[model]:g} in baseline")
    both = grid(new).merge(grid(baseline), left_index=True, right_index=True, suffixes=("_new", "_base"))
    for (model, pert), r in both.iterrows():
        if r.levels_new != r.levels_base:
            out.append(f"{model} · {pert}: levels {_levels(r.levels_new)} in new, {_levels(r.levels_base)} in baseline")
        if r.draws_new != r.draws_base:
            out.append(f"{model} · {pert}: {r.draws_new} draws per level in new, {r.draws_base} in baseline")
    return out


def _levels(levels: tuple) -> str:
    return ", ".join(f"{x:g}" for x in levels)


def to_markdown(c: Comparison, max_drop: float, show_all: bool = False) -> str:
    shown = c.table if show_all else c.table[(c.table["delta"].abs() > 1e-9) | c.table["regression"]]
    lines = [
        f"### lesionbench compare (max drop {max_drop:g})",
        "",
        f"{len(c.table)} quantities compared, {int(c.table['regression'].sum())} regressions.",
        "",
    ]
    if c.warnings:
        lines += ["**The two runs were not measured alike** (differences may come from this):", ""]
        lines += [f"- ⚠ {md(w)}" for w in c.warnings] + [""]
    if not shown.empty:
        lines += ["| model | dataset | quantity | baseline | new | Δ | |", "|---|---|---|---|---|---|---|"]
        for r in shown.sort_values("delta").itertuples():
            flag = "❌ regression" if r.regression else ("⬆" if round(r.delta, 3) > 0 else "")
            lines.append(
                f"| {md(r.model)} | {md(r.dataset)} | {md(r.what)} | {r.baseline:.3f} | {r.new:.3f} | {r.delta:+.3f} | {flag} |"
            )
        lines.append("")
    for title, summary in (("Only in new", c.only_new_summary), ("Only in baseline (not compared)", c.only_baseline_summary)):
        if summary:
            lines += [f"{title}:", ""] + [f"- {md(x)}" for x in summary] + [""]
    return "\n".join(lines).rstrip() + "\n"
