"""The CI regression gate: compare the layer scores of a new results table with a baseline's.

Cells are matched on model, dataset, layer and perturbation. A layer score or a clean accuracy is
a **regression** when it drops by more than ``max_drop`` (absolute) *and* the drop is significant:
with per-image outcomes on both sides, the 95% interval of the change (new − baseline) from a
paired bootstrap (:data:`TEST`) lies entirely below 0. Without outcomes on either side (runs made
before they were kept) the threshold alone decides, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lesionbench.bootstrapping import BOOTSTRAP_SEED, REPLICATES, bootstrap, interval
from lesionbench.errors import LesionbenchError
from lesionbench.layer_score import DEFAULT_SCORE
from lesionbench.leaderboard import md, table
from lesionbench.scores import clean_accuracy, layer_scores
from lesionbench.store import CLEAN, Outcomes

KEYS = ["model", "dataset", "layer", "perturbation"]
TEST = (
    "paired bootstrap test: images resampled jointly for both runs (an image both evaluated counts for "
    "both in every replicate; runs on different images are not paired), draws resampled within each level "
    "with their full between-draw variance; significant when the two-sided 95% interval of the change "
    "excludes 0"
)
_SIDES = ("\x1fnew", "\x1fbase")


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per matched quantity: what, new, baseline, verdict_new, verdict_base (critical /
    # robust / undetermined, from the intervals as on the leaderboard; "" for clean accuracies), delta, low, high,
    # significant, regression
    only_new: list[str]
    only_baseline: list[str]
    # the same, summarised per model and perturbation; and where the two runs are not alike
    only_new_summary: list[str] = field(default_factory=list)
    only_baseline_summary: list[str] = field(default_factory=list)
    tested: bool = False  # intervals from per-image outcomes (else the threshold alone)
    warnings: list[str] = field(default_factory=list)  # differences in how the two runs were made
    missing_cells: list[str] = field(default_factory=list)  # baseline cells (…, level, draw) the new run lacks

    @property
    def failed(self) -> bool:
        """The gate fails: a regression, or a new run lacking cells of the baseline (an unfinished run)."""
        return bool(len(self.regressions) or self.missing_cells)

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["regression"]]


def compare(
    new: pd.DataFrame,
    baseline: pd.DataFrame,
    max_drop: float = 0.05,
    metric: str = "top1",
    new_outcomes: Outcomes | None = None,
    base_outcomes: Outcomes | None = None,
    replicates: int = REPLICATES,
    seed: int = BOOTSTRAP_SEED,
    score: str = DEFAULT_SCORE,
) -> Comparison:
    """Match the two tables' layer scores and clean accuracies; flag significant drops beyond ``max_drop``.

    ``new_outcomes``/``base_outcomes``: the per-image outcomes the tables' ``outcome`` columns point
    into (:func:`lesionbench.store.read_results_with_outcomes`); with both, each change gets its
    95% interval and a regression must be significant (:data:`TEST`). Raises LesionbenchError for a
    bad ``max_drop`` or tables with nothing in common. ``score``: the layer score's registered name.
    """
    if not math.isfinite(max_drop) or max_drop < 0:
        raise LesionbenchError(f"--max-drop must be a non-negative number, got {max_drop}")
    ns, bs = layer_scores(new, metric, score), layer_scores(baseline, metric, score)
    merged = ns.merge(bs, on=KEYS, suffixes=("_new", "_base"), how="outer", indicator=True)
    both = merged[merged["_merge"] == "both"]
    missing = missing_cells(new, baseline)  # fails the gate even where no score could be compared
    rows = [
        dict(
            model=r.model,
            dataset=r.dataset,
            what=f"{r.layer} · {r.perturbation} score",
            layer=r.layer,
            perturbation=r.perturbation,
            new=r.score_new,
            baseline=r.score_base,
            verdict_new=r.verdict_new,
            verdict_base=r.verdict_base,
        )
        for r in both.itertuples()
    ]
    for label, m in (("clean top-1", "top1"), ("clean top-5", "top5")):
        a, b = clean_accuracy(new, m), clean_accuracy(baseline, m)
        for r in a.merge(b, on=["model", "dataset"], suffixes=("_new", "_base")).itertuples():
            rows.append(
                dict(
                    model=r.model,
                    dataset=r.dataset,
                    what=label,
                    layer="",
                    perturbation=m,
                    new=r.clean_new,
                    baseline=r.clean_base,
                    verdict_new="",
                    verdict_base="",
                )
            )
    if not rows:  # (a model at chance has no layer scores; its clean accuracy is still compared)
        raise LesionbenchError("the two results tables share no model × layer × perturbation to compare")
    out = pd.DataFrame(
        rows,
        columns=["model", "dataset", "what", "layer", "perturbation", "new", "baseline", "verdict_new", "verdict_base"],
    )
    out["delta"] = out["new"] - out["baseline"]
    out["low"], out["high"] = np.nan, np.nan
    tested = _intervals(out, new, baseline, new_outcomes, base_outcomes, metric, replicates, seed, score)
    out["significant"] = out["high"] < 0  # a drop beyond doubt; NaN (untested) compares False
    beyond = out["delta"] < -max_drop - 1e-12
    out["regression"] = beyond & (out["significant"] | out["low"].isna())
    label = lambda df: sorted(f"{r.model} {r.layer} {r.perturbation}" for r in df.itertuples())  # noqa: E731
    return Comparison(
        table=out.drop(columns=["layer", "perturbation"]),
        only_new=label(merged[merged["_merge"] == "left_only"]),
        only_baseline=label(merged[merged["_merge"] == "right_only"]),
        only_new_summary=summarise_missing(merged[merged["_merge"] == "left_only"], bs),
        only_baseline_summary=summarise_missing(merged[merged["_merge"] == "right_only"], ns),
        tested=tested,
        warnings=list(_other_images(new, baseline, new_outcomes, base_outcomes).values()) + differences(new, baseline),
        missing_cells=missing,
    )


def missing_cells(new: pd.DataFrame, baseline: pd.DataFrame) -> list[str]:
    """The baseline's cells (model, dataset, layer, perturbation, level, draw) that the new table lacks."""
    cell = KEYS + ["level", "draw"]
    merged = baseline[cell].drop_duplicates().merge(new[cell].drop_duplicates(), on=cell, how="left", indicator=True)
    gone = merged[merged["_merge"] == "left_only"]
    return [f"{r.model} {r.layer or '(clean)'} {r.perturbation} {r.level:g} #{int(r.draw)}" for r in gone.itertuples()]


def _intervals(
    out: pd.DataFrame,
    new: pd.DataFrame,
    baseline: pd.DataFrame,
    new_outcomes,
    base_outcomes,
    metric: str,
    replicates: int,
    seed: int,
    score: str = DEFAULT_SCORE,
) -> bool:
    """Fill ``low``/``high`` of each change from one bootstrap over both runs; False when there are no outcomes."""
    if new_outcomes is None or base_outcomes is None or "outcome" not in new or "outcome" not in baseline:
        return False
    if not ((new["outcome"] >= 0).any() and (baseline["outcome"] >= 0).any()):
        return False
    unpaired = set(_other_images(new, baseline, new_outcomes, base_outcomes))
    tagged = []
    for side, df, offset in ((_SIDES[0], new, 0), (_SIDES[1], baseline, len(new_outcomes))):
        t = df.copy()
        apart = t["model"].isin(unpaired)  # other images: each run's images resampled on their own
        t.loc[apart, "dataset"] = t.loc[apart, "dataset"] + side
        t["model"] = t["model"] + side
        t["outcome"] = np.where(t["outcome"] >= 0, t["outcome"] + offset, -1)
        tagged.append(t)
    keys = [o.keys.assign(model=o.keys["model"] + side) for o, side in zip((new_outcomes, base_outcomes), _SIDES)]
    outcomes = Outcomes.concat(
        Outcomes(keys[0], new_outcomes.top1, new_outcomes.top5, new_outcomes.images),
        Outcomes(keys[1], base_outcomes.top1, base_outcomes.top5, base_outcomes.images),
    )
    both = pd.concat(tagged, ignore_index=True)
    boot = bootstrap(both, outcomes, metric, replicates, seed, score=score)
    index = {tuple(k): i for i, k in enumerate(boot.layers[KEYS].itertuples(index=False))}
    clean5 = bootstrap(both[both["perturbation"] == CLEAN], outcomes, "top5", replicates, seed).clean
    cleans = {
        "top1": boot.clean
        if metric == "top1"
        else bootstrap(both[both["perturbation"] == CLEAN], outcomes, "top1", replicates, seed).clean,
        "top5": clean5,
    }
    for i, r in out.iterrows():
        da, db = (r["dataset"] + side if r["model"] in unpaired else r["dataset"] for side in _SIDES)
        if r["layer"] == "" and r["perturbation"] in cleans:
            a = cleans[r["perturbation"]].get((r["model"] + _SIDES[0], da))
            b = cleans[r["perturbation"]].get((r["model"] + _SIDES[1], db))
        else:
            ia = index.get((r["model"] + _SIDES[0], da, r["layer"], r["perturbation"]))
            ib = index.get((r["model"] + _SIDES[1], db, r["layer"], r["perturbation"]))
            a = boot.score_reps[ia] if ia is not None else None
            b = boot.score_reps[ib] if ib is not None else None
            if ia is not None and ib is not None:  # the verdicts from the intervals, as the leaderboard's
                out.loc[i, "verdict_new"], out.loc[i, "verdict_base"] = boot.layers["verdict"].iloc[[ia, ib]]
        if a is not None and b is not None:
            out.loc[i, "low"], out.loc[i, "high"] = interval(a - b)
    return bool(out["low"].notna().any())


def _images_of(df: pd.DataFrame, outcomes: Outcomes) -> dict[str, frozenset]:
    """Per model: the (dataset, split, index) of every image its clean row evaluated."""
    out = {}
    clean = df[(df["perturbation"] == CLEAN) & (df["outcome"] >= 0)].drop_duplicates("model")
    for model, row in zip(clean["model"], clean["outcome"]):
        cols = np.flatnonzero(outcomes.top1[int(row)] >= 0)
        img = outcomes.images.iloc[cols]
        out[model] = frozenset(zip(img["dataset"], img["split"], img["index"]))
    return out


def _other_images(
    new: pd.DataFrame, baseline: pd.DataFrame, new_outcomes: Outcomes | None, base_outcomes: Outcomes | None
) -> dict[str, str]:
    """Models whose two runs evaluated different images, each with a one-line description."""
    if new_outcomes is None or base_outcomes is None or "outcome" not in new or "outcome" not in baseline:
        return {}
    a, b = _images_of(new, new_outcomes), _images_of(baseline, base_outcomes)
    return {
        m: (
            f"{m}: the runs evaluated different images ({len(a[m])} in new, {len(b[m])} in baseline, "
            f"{len(a[m] & b[m])} in common; an older run's subset followed the study seed): its changes are "
            "not paired, each run's images are resampled on their own"
        )
        for m in sorted(set(a) & set(b))
        if a[m] != b[m]
    }


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
    rule = (
        f"a drop of more than {max_drop:g} that is significant ({TEST})"
        if c.tested
        else f"a drop of more than {max_drop:g} (no per-image outcomes on both sides: the threshold alone decides)"
    )
    lines = [
        f"### lesionbench compare (max drop {max_drop:g})",
        "",
        f"{len(c.table)} quantities compared, {int(c.table['regression'].sum())} regressions. A regression is {rule}.",
        "",
    ]
    if c.missing_cells:
        shown_cells = ", ".join(c.missing_cells[:5]) + (", …" if len(c.missing_cells) > 5 else "")
        lines += [
            f"**❌ The new run lacks {len(c.missing_cells)} cells the baseline has** ({md(shown_cells)}): the "
            "comparison fails until the new run is finished (lesionbench run --resume).",
            "",
        ]
    if c.warnings:
        lines += ["**The two runs were not measured alike** (differences may come from this):", ""]
        lines += [f"- ⚠ {md(w)}" for w in c.warnings] + [""]
    if not shown.empty:
        rows = []
        for r in shown.sort_values("delta").itertuples():
            change = f"{r.delta:+.3f}" + (f" [{r.low:+.3f}, {r.high:+.3f}]" if r.low == r.low else "")
            flag = "❌ regression" if r.regression else ("⬆" if r.delta >= 0.0005 else "")
            if not r.regression and r.delta < -max_drop - 1e-12:
                flag = "not significant"
            verdict = r.verdict_base if r.verdict_base == r.verdict_new else f"{r.verdict_base} → {r.verdict_new}"
            rows.append(
                {
                    "model": md(r.model),
                    "dataset": md(r.dataset),
                    "quantity": md(r.what),
                    "baseline": f"{r.baseline:.3f}",
                    "new": f"{r.new:.3f}",
                    "Δ [95% interval]" if c.tested else "Δ": change,
                    "verdict": verdict,
                    "": flag,
                }
            )
        lines += [table(rows), ""]
    for title, summary in (
        ("Only in new", c.only_new_summary),
        ("Only in baseline (not compared)", c.only_baseline_summary),
    ):
        if summary:
            lines += [f"{title}:", ""] + [f"- {md(x)}" for x in summary] + [""]
    return "\n".join(lines).rstrip() + "\n"
