"""Layer-robustness scores: pure functions from a results table to numbers.

For each model × layer × perturbation the mean over draws of the score metric gives a curve
acc(p). Its retention r(p) = clip((acc(p) − chance) / (acc(0) − chance), 0, 1) rescales it so that
1 is the clean model and 0 is chance; the **layer-robustness score** is the area under r over the
level range divided by that range, rescaled so that chance at every damaged level is 0 and no loss
is 1 on any level grid (a grid holding the undamaged level 0 would otherwise have a floor above 0:
(1 + r)/2 on the grid (0, 1); :func:`lesionbench.layer_score.layer_values`). The **critical level** p½ is where r first falls to 0.5. A
layer is *critical* when its score, to two decimals, is below 0.50; with a 95% interval, critical
/ robust / undetermined as the interval lies below, above or across 0.50 (:func:`verdict`). A
model whose clean accuracy is not beyond chance (a binomial test, :func:`at_chance`) is not scored.

The layer score itself is a plugin kind (:mod:`lesionbench.layer_score`: ``area``, the above, by
default; ``score=NAME`` picks another registered one). With per-image outcomes (``outcomes.arrow``),
:func:`lesionbench.bootstrapping.bootstrap` gives every score a 95% interval by a paired bootstrap over
images and draws, :func:`lesionbench.per_image.per_class_accuracy` the accuracy per class (both
also importable from here, as before).

Levels are read on the axis each row's ``level_axis`` names: ``linear``; ``log`` (bit error rates
from 1e-7 to 1e-3: area over log10 p, so each decade counts the same, level 0 left out);
``descending`` (quantisation bits: damage grows as the level falls, so the axis runs 8 → 2).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lesionbench.errors import LesionbenchError
from lesionbench.kinds import axis_scale
from lesionbench.layer_score import DEFAULT_SCORE, THRESHOLD, AreaScore, Score, get_score, layer_values

# NONFINITE cells are scored, not dropped: an image whose logits hold NaN/Inf counts as wrong
# (lesionbench.evaluate), so a network that emits NaN everywhere scores 0 retention, as chance would
from lesionbench.store import CLEAN, NONFINITE

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
    if "level_axis" not in cells.columns:
        cells["level_axis"] = "linear"
    g = cells.groupby(GROUP + ["level"], sort=True)
    out = g[metric].agg(mean="mean", std="std", n="count").reset_index()
    out["level_axis"] = g["level_axis"].first().to_numpy()
    out["std"] = out["std"].fillna(0.0)
    t = np.zeros(len(out))
    if (out["n"] > 1).any():  # scipy only where there is an interval to compute
        from scipy import stats

        t = np.where(out["n"] > 1, stats.t.ppf(0.975, np.maximum(out["n"] - 1, 1)), 0.0)
    half = t * out["std"] / np.sqrt(out["n"])
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    clean = clean_accuracy(df, metric)
    out = out.merge(clean, on=["model", "dataset"], how="left")
    chance_models = at_chance(df, metric)
    out["scored"] = (
        ~pd.Series(list(zip(out["model"], out["dataset"])))
        .isin(set(zip(chance_models["model"], chance_models["dataset"])))
        .to_numpy()
    )
    out["relative_drop"] = (out["mean"] - out["clean"]) / out["clean"]
    out["retention"] = retention(out["mean"], out["clean"], out["chance"])
    return out


def clean_accuracy(df: pd.DataFrame, metric: str = "top1") -> pd.DataFrame:
    """Per model and dataset: clean accuracy and chance, from the clean row."""
    clean = df[df["perturbation"] == CLEAN]
    missing = set(df.loc[df["perturbation"] != CLEAN, "model"]) - set(clean["model"])
    if missing:
        raise LesionbenchError(f"results for model(s) {', '.join(sorted(missing))} have no clean row; cannot score")
    _check_one_clean_evaluation(clean, metric)
    given = f"chance_{metric}"  # a clean row's own chance (text: the unigram predictor's accuracy)
    clean = clean if given in clean.columns else clean.assign(**{given: np.nan})
    cols = ["model", "dataset", metric, "num_classes", given]
    out = clean[cols].drop_duplicates(["model", "dataset"]).rename(columns={metric: "clean"})
    out["chance"] = [
        chance_level(metric, int(n)) if pd.isna(c) else float(c) for n, c in zip(out["num_classes"], out[given])
    ]
    return out.drop(columns=["num_classes", given])


def _check_one_clean_evaluation(clean: pd.DataFrame, metric: str) -> None:
    """Refuse a model whose runs on one dataset disagree on the clean evaluation: each run's cells
    would be scored against one of the clean accuracies, silently the wrong one for the others.

    Disagreement is a different ``n_images`` or a different clean ``metric``: other images, or the
    same images with other numerics (a GPU's TF32 convolutions, autocast) that flip a prediction.
    Two subsets of the same size with the same clean accuracy pass unseen.

    Raises:
        LesionbenchError: naming the model, the dataset and the clean evaluations that differ.
    """
    clean = clean.assign(
        n_images=clean["n_images"] if "n_images" in clean.columns else np.nan,
        device=clean["device"] if "device" in clean.columns else "?",
    )
    spread = clean.groupby(["model", "dataset"])[["n_images", metric]].nunique()
    mixed = spread[(spread > 1).any(axis=1)]
    if mixed.empty:
        return
    model, dataset = mixed.index[0]
    mine = clean[(clean["model"] == model) & (clean["dataset"] == dataset)]
    seen = mine[["n_images", "device", metric]].drop_duplicates().itertuples(index=False)
    evaluations = "; ".join(f"{int(n) if n == n else '?'} images on {d}, clean {metric} {v:.4f}" for n, d, v in seen)
    raise _mixed_runs(
        model,
        dataset,
        f"has clean evaluations that disagree ({evaluations}): its runs were "
        "evaluated on different images or with different numerics",
    )


def _mixed_runs(model: str, dataset: str, what: str) -> LesionbenchError:
    """The one-line refusal of the two checks that a model's runs on a dataset share their clean evaluation."""
    return LesionbenchError(
        f"model {model!r} on dataset {dataset!r} {what}, so their cells cannot share one clean accuracy; re-run "
        "them on the same images (n_images, seed, data) and device, or score them separately"
    )


def retention(acc, clean, chance):
    """clip((acc − chance) / (clean − chance), 0, 1); 0 where the clean model is itself at chance."""
    acc, clean, chance = (np.asarray(x, dtype=float) for x in (acc, clean, chance))
    denom = clean - chance
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(denom > 0, (acc - chance) / denom, 0.0)
    return np.clip(np.nan_to_num(r, nan=0.0), 0.0, 1.0)


def area_score(levels, r, axis: str = "linear") -> float:
    """The ``area`` layer score of one curve on a level grid: the area under r over the level range,
    divided by the range (trapezoids; :class:`lesionbench.layer_score.AreaScore`), rescaled so that
    chance at every damaged level scores 0 and no loss 1 whatever the grid
    (:func:`lesionbench.layer_score.layer_values`; level 0 of a linear axis is the undamaged one)."""
    undamaged = axis_scale(axis).undamaged(levels)
    return float(layer_values(AreaScore(), levels, np.asarray(r, dtype=float)[:, None], undamaged)[0][0])


def critical_level(levels, r, threshold: float = THRESHOLD) -> float:
    """First level where r falls to ``threshold`` (linear interpolation); inf when it never does
    (:func:`lesionbench.layer_score.critical_positions` of one curve)."""
    from lesionbench.layer_score import critical_positions

    levels, r = np.asarray(levels, dtype=float), np.asarray(r, dtype=float)
    order = np.argsort(levels, kind="stable")
    return float(critical_positions(levels[order], r[order][:, None], threshold)[0])


VERDICTS = ("critical", "robust", "undetermined")
NOT_SCORED = "not scored: clean accuracy at chance"
CHANCE_ALPHA = 0.05


def verdict(score: float, low: float = math.nan, high: float = math.nan) -> str:
    """A layer's verdict, as printed (two decimals), so label and numbers never disagree.

    With a 95% interval [low, high]: "critical" when its upper end is below 0.50, "robust" when its
    lower end is at least 0.50, "undetermined" when the interval contains the threshold. Without
    one (no per-image outcomes, or intervals withheld): from the score alone, "critical" below 0.50,
    else "robust"."""
    if math.isnan(float(low)) or math.isnan(float(high)):
        return "critical" if round(float(score), 2) < 0.5 else "robust"
    if round(float(high), 2) < 0.5:
        return "critical"
    return "robust" if round(float(low), 2) >= 0.5 else "undetermined"


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p): the exact sum of the probabilities C(n, i)·pⁱ·(1 − p)ⁿ⁻ⁱ for
    i = k … n, each computed in log space (``math.lgamma``) and added with ``math.fsum``. The p-value
    of the one-sided exact binomial test (alternative "greater"), as ``scipy.stats.binomtest``
    reports it, without importing scipy (0.7 CPU s) into every run."""
    if k <= 0 or p >= 1.0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    logs = [log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def beyond_chance(clean: float, n_images: float, chance: float, alpha: float = CHANCE_ALPHA) -> bool:
    """Is a clean accuracy beyond chance: a one-sided exact binomial test (alternative "greater";
    :func:`binomial_sf`) of round(clean·n_images) hits in ``n_images`` against ``chance`` rejects at
    level ``alpha``? An unknown image count (NaN, older tables) counts as beyond chance when the
    accuracy exceeds chance."""
    if not (n_images == n_images) or n_images <= 0:
        return bool(clean > chance)
    n = int(n_images)
    k = min(n, max(0, int(round(float(clean) * n))))
    return bool(binomial_sf(k, n, min(1.0, chance)) < alpha)


def at_chance(df: pd.DataFrame, metric: str = "top1") -> pd.DataFrame:
    """The models (per dataset) whose clean accuracy is not beyond chance (:func:`beyond_chance`):
    they are not scored. Columns model, dataset, clean, chance, n_images."""
    clean = df[df["perturbation"] == CLEAN].drop_duplicates(["model", "dataset"])
    n = clean["n_images"] if "n_images" in clean.columns else pd.Series(np.nan, index=clean.index)
    chance = np.array([chance_level(metric, int(k)) for k in clean["num_classes"]])
    if f"chance_{metric}" in clean.columns:  # a chance recorded with the run (text: the unigram predictor's)
        own = clean[f"chance_{metric}"].to_numpy(float)
        chance = np.where(np.isnan(own), chance, own)
    keep = [not beyond_chance(c, m, ch) for c, m, ch in zip(clean[metric], n, chance)]
    out = pd.DataFrame(
        {"model": clean["model"], "dataset": clean["dataset"], "clean": clean[metric], "chance": chance, "n_images": n}
    )
    return out[keep].reset_index(drop=True)


def to_axis(levels, axis: str) -> np.ndarray:
    """Positions on the scoring axis, where damage grows from left to right (:meth:`AxisScale.to_coord`)."""
    return axis_scale(axis).to_coord(levels)


def from_axis(x: float, axis: str) -> float:
    """The level at scoring-axis position ``x``; ±inf and NaN stay as they are (:meth:`AxisScale.from_coord`)."""
    return axis_scale(axis).from_coord(x)


def layer_scores(df: pd.DataFrame, metric: str = "top1", score: str | Score = DEFAULT_SCORE) -> pd.DataFrame:
    """One row per model × layer × perturbation: score, critical level and verdict.

    ``score``: the name of a registered score (``lesionbench list scores``; default ``area``).
    ``max_level`` is the most damaging level studied (the largest, or the fewest bits).

    Raises:
        LesionbenchError: an unknown score name (the registered ones listed)."""
    return _scores_of_curves(curves(df, metric), score)


def levels_of(positions: np.ndarray, axis: str) -> np.ndarray:
    """:func:`from_axis` for an array of positions: an infinite one (never reached) stays +inf."""
    return axis_scale(axis).from_coord(np.asarray(positions, dtype=float))


def _scores_of_curves(c: pd.DataFrame, score: str | Score = DEFAULT_SCORE) -> pd.DataFrame:
    chosen = get_score(score)
    rows = []
    for key, g in c.groupby(GROUP, sort=False):
        if "scored" in g.columns and not g["scored"].iloc[0]:
            continue  # clean accuracy at chance: not scored (at_chance)
        axis = g["level_axis"].iloc[0]
        g = g[axis_scale(axis).scored(g["level"])]
        if g.empty:
            continue
        x = to_axis(g["level"], axis)
        value, critical = layer_values(
            chosen, x, g["retention"].to_numpy(dtype=float)[:, None], axis_scale(axis).undamaged(g["level"])
        )
        rows.append(
            dict(
                zip(GROUP, key),
                score=float(value[0]),
                critical_level=float(levels_of(critical, axis)[0]),
                max_level=from_axis(float(x.max()), axis),
                level_axis=axis,
                verdict=verdict(float(value[0])),
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


_MOVED = {  # name -> the module it lives in now; ``from lesionbench.scores import bootstrap`` still works
    **dict.fromkeys(["per_class_accuracy", "_hits", "_check_same_images"], "lesionbench.per_image"),
    **dict.fromkeys(
        [
            "REPLICATES",
            "BOOTSTRAP_SEED",
            "CONFIDENCE",
            "METHOD",
            "Bootstrap",
            "interval",
            "bootstrap",
            "draw_quantile_factor",
            "_resample_draws",
            "_draw_variance_unknown",
            "_layer_replicates",
        ],
        "lesionbench.bootstrapping",
    ),
}


def __getattr__(name: str):
    if name in _MOVED:  # loaded on use: the bootstrap imports this module, not the other way round
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'lesionbench.scores' has no attribute {name!r}")
