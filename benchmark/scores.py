"""Layer-robustness scores: pure functions from a results table to numbers.

For each model × layer × perturbation the mean over draws of the score metric gives a curve
acc(p). Its retention r(p) = clip((acc(p) − chance) / (acc(0) − chance), 0, 1) rescales it so that
1 is the clean model and 0 is chance; the **layer-robustness score** is the area under r over the
level range divided by that range. The **critical level** p½ is where r first falls to 0.5.

Levels are read on the axis each row's ``level_axis`` names: ``linear``; ``log`` (bit error rates
from 1e-7 to 1e-3: area over log10 p, so each decade counts the same, level 0 left out);
``descending`` (quantisation bits: damage grows as the level falls, so the axis runs 8 → 2).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from lesionbench.errors import LesionbenchError
from lesionbench.store import CLEAN, NONFINITE  # NONFINITE cells are scored as chance, not dropped

GROUP = ["model", "dataset", "layer", "layer_index", "relative_depth", "perturbation"]

TOPK = {"top1": 1, "top5": 5}


def chance_level(metric: str, num_classes: int) -> float:
    """Accuracy of guessing: k/classes for top-k."""
    return min(1.0, TOPK[metric] / num_classes)


def curves(df: pd.DataFrame, metric: str = "top1") -> pd.DataFrame:
    """Mean, std, count and 95% t-interval over draws per layer × perturbation × level, with the
    relative drop (acc(p) − acc(0)) / acc(0) and the retention r(p)."""
    error = df["error"].fillna("")
    cells = df[(df["perturbation"] != CLEAN) & ((error == "") | (error == NONFINITE))].copy()
    broken = cells["error"] == NONFINITE
    cells.loc[broken, metric] = [chance_level(metric, int(n)) for n in cells.loc[broken, "num_classes"]]
    if "level_axis" not in cells.columns:
        cells["level_axis"] = "linear"
    g = cells.groupby(GROUP + ["level"], sort=True)
    out = g[metric].agg(mean="mean", std="std", n="count").reset_index()
    out["level_axis"] = g["level_axis"].first().to_numpy()
    out["std"] = out["std"].fillna(0.0)
    t = np.where(out["n"] > 1, stats.t.ppf(0.975, np.maximum(out["n"] - 1, 1)), 0.0)
    half = t * out["std"] / np.sqrt(out["n"])
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    clean = clean_accuracy(df, metric)
    out = out.merge(clean, on=["model", "dataset"], how="left")
    out["relative_drop"] = (out["mean"] - out["clean"]) / out["clean"]
    out["retention"] = retention(out["mean"], out["clean"], out["chance"])
    return out


def clean_accuracy(df: pd.DataFrame, metric: str = "top1") -> pd.DataFrame:
    """Per model and dataset: clean accuracy and chance, from the clean row."""
    clean = df[df["perturbation"] == CLEAN]
    missing = set(df.loc[df["perturbation"] != CLEAN, "model"]) - set(clean["model"])
    if missing:
        raise LesionbenchError(f"results for model(s) {', '.join(sorted(missing))} have no clean row; cannot score")
    cols = ["model", "dataset", metric, "num_classes"]
    out = clean[cols].drop_duplicates(["model", "dataset"]).rename(columns={metric: "clean"})
    out["chance"] = [chance_level(metric, int(n)) for n in out["num_classes"]]
    return out.drop(columns="num_classes")


def retention(acc, clean, chance):
    """clip((acc − chance) / (clean − chance), 0, 1); 0 where the clean model is itself at chance."""
    acc, clean, chance = (np.asarray(x, dtype=float) for x in (acc, clean, chance))
    denom = clean - chance
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(denom > 0, (acc - chance) / denom, 0.0)
    return np.clip(np.nan_to_num(r, nan=0.0), 0.0, 1.0)


def area_score(levels, r) -> float:
    """Area under r over the level range, divided by the range (trapezoids)."""
    levels, r = np.asarray(levels, dtype=float), np.asarray(r, dtype=float)
    order = np.argsort(levels)
    levels, r = levels[order], r[order]
    if len(levels) == 1 or levels[-1] == levels[0]:
        return float(r.mean())
    return float(np.trapezoid(r, levels) / (levels[-1] - levels[0]))


def critical_level(levels, r, threshold: float = 0.5) -> float:
    """First level where r falls to ``threshold`` (linear interpolation); inf when it never does."""
    levels, r = np.asarray(levels, dtype=float), np.asarray(r, dtype=float)
    order = np.argsort(levels)
    levels, r = levels[order], r[order]
    for i, value in enumerate(r):
        if value <= threshold:
            if i == 0:
                return float(levels[0])
            x0, x1, y0, y1 = levels[i - 1], levels[i], r[i - 1], r[i]
            return float(x0 + (y0 - threshold) * (x1 - x0) / (y0 - y1))
    return math.inf


def to_axis(levels, axis: str) -> np.ndarray:
    """Positions on the scoring axis, where damage grows from left to right."""
    levels = np.asarray(levels, dtype=float)
    if axis == "log":
        with np.errstate(divide="ignore"):
            return np.log10(levels)
    return -levels if axis == "descending" else levels


def from_axis(x: float, axis: str) -> float:
    if not math.isfinite(x):
        return x
    return float(10**x) if axis == "log" else (-x if axis == "descending" else x)


def layer_scores(df: pd.DataFrame, metric: str = "top1") -> pd.DataFrame:
    """One row per model × layer × perturbation: score, critical level and verdict.

    ``max_level`` is the most damaging level studied (the largest, or the fewest bits)."""
    c = curves(df, metric)
    rows = []
    for key, g in c.groupby(GROUP, sort=False):
        axis = g["level_axis"].iloc[0]
        if axis == "log":
            g = g[g["level"] > 0]
        if g.empty:
            continue
        x = to_axis(g["level"], axis)
        score = area_score(x, g["retention"])
        rows.append(
            dict(
                zip(GROUP, key),
                score=score,
                critical_level=from_axis(critical_level(x, g["retention"]), axis),
                max_level=from_axis(float(x.max()), axis),
                level_axis=axis,
                verdict="critical" if score < 0.5 else "robust",
            )
        )
    out = pd.DataFrame(rows, columns=GROUP + ["score", "critical_level", "max_level", "level_axis", "verdict"])
    return out.sort_values(["model", "perturbation", "layer_index"], ignore_index=True)


def model_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Per model × perturbation: mean layer score, weakest layer, first- and last-layer scores."""
    rows = []
    for (model, dataset, pert), g in scores.groupby(["model", "dataset", "perturbation"], sort=True):
        g = g.sort_values("layer_index")
        weakest = g.loc[g["score"].idxmin()]
        rows.append(
            dict(
                model=model,
                dataset=dataset,
                perturbation=pert,
                mean_score=float(g["score"].mean()),
                weakest_layer=weakest["layer"],
                weakest_score=float(weakest["score"]),
                first_layer_score=float(g["score"].iloc[0]),
                last_layer_score=float(g["score"].iloc[-1]),
            )
        )
    return pd.DataFrame(rows)
