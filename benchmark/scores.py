"""Layer-robustness scores: pure functions from a results table to numbers.

For each model × layer × perturbation the mean over draws of the score metric gives a curve
acc(p). Its retention r(p) = clip((acc(p) − chance) / (acc(0) − chance), 0, 1) rescales it so that
1 is the clean model and 0 is chance; the **layer-robustness score** is the area under r over the
level range divided by that range. The **critical level** p½ is where r first falls to 0.5. A
layer is *critical* when its score, to two decimals, is below 0.50; with a 95% interval, critical
/ robust / undetermined as the interval lies below, above or across 0.50 (:func:`verdict`). A
model whose clean accuracy is not beyond chance (a binomial test, :func:`at_chance`) is not scored.

With per-image outcomes (``outcomes.arrow``), :func:`bootstrap` gives every score a 95% interval
by a paired bootstrap over images and draws, :func:`per_class_accuracy` the accuracy per class.

Levels are read on the axis each row's ``level_axis`` names: ``linear``; ``log`` (bit error rates
from 1e-7 to 1e-3: area over log10 p, so each decade counts the same, level 0 left out);
``descending`` (quantisation bits: damage grows as the level falls, so the axis runs 8 → 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lesionbench.errors import LesionbenchError
from lesionbench.kinds import axis_scale
# NONFINITE cells are scored, not dropped: an image whose logits hold NaN/Inf counts as wrong
# (lesionbench.evaluate), so a network that emits NaN everywhere scores 0 retention, as chance would
from lesionbench.store import CLEAN, NONFINITE, Outcomes

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
    out["scored"] = ~pd.Series(list(zip(out["model"], out["dataset"]))).isin(
        set(zip(chance_models["model"], chance_models["dataset"]))).to_numpy()  # fmt: skip
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
    out["chance"] = [chance_level(metric, int(n)) if pd.isna(c) else float(c) for n, c in zip(out["num_classes"], out[given])]
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
    clean = clean.assign(n_images=clean["n_images"] if "n_images" in clean.columns else np.nan,
                         device=clean["device"] if "device" in clean.columns else "?")  # fmt: skip
    spread = clean.groupby(["model", "dataset"])[["n_images", metric]].nunique()
    mixed = spread[(spread > 1).any(axis=1)]
    if mixed.empty:
        return
    model, dataset = mixed.index[0]
    mine = clean[(clean["model"] == model) & (clean["dataset"] == dataset)]
    seen = mine[["n_images", "device", metric]].drop_duplicates().itertuples(index=False)
    evaluations = "; ".join(f"{int(n) if n == n else '?'} images on {d}, clean {metric} {v:.4f}" for n, d, v in seen)
    raise _mixed_runs(model, dataset, f"has clean evaluations that disagree ({evaluations}): its runs were "
                      "evaluated on different images or with different numerics")  # fmt: skip


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


def beyond_chance(clean: float, n_images: float, chance: float, alpha: float = CHANCE_ALPHA) -> bool:
    """Is a clean accuracy beyond chance: a one-sided exact binomial test (``scipy.stats.binomtest``,
    alternative "greater") of round(clean·n_images) hits in ``n_images`` against ``chance`` rejects at
    level ``alpha``? An unknown image count (NaN, older tables) counts as beyond chance when the
    accuracy exceeds chance."""
    if not (n_images == n_images) or n_images <= 0:
        return bool(clean > chance)
    from scipy import stats  # here: importing lesionbench does not load scipy

    n = int(n_images)
    k = min(n, max(0, int(round(float(clean) * n))))
    return bool(stats.binomtest(k, n, min(1.0, chance), alternative="greater").pvalue < alpha)


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
    out = pd.DataFrame({"model": clean["model"], "dataset": clean["dataset"], "clean": clean[metric],
                        "chance": chance, "n_images": n})  # fmt: skip
    return out[keep].reset_index(drop=True)


def to_axis(levels, axis: str) -> np.ndarray:
    """Positions on the scoring axis, where damage grows from left to right (:meth:`AxisScale.to_coord`)."""
    return axis_scale(axis).to_coord(levels)


def from_axis(x: float, axis: str) -> float:
    """The level at scoring-axis position ``x``; ±inf and NaN stay as they are (:meth:`AxisScale.from_coord`)."""
    return axis_scale(axis).from_coord(x)


def layer_scores(df: pd.DataFrame, metric: str = "top1") -> pd.DataFrame:
    """One row per model × layer × perturbation: score, critical level and verdict.

    ``max_level`` is the most damaging level studied (the largest, or the fewest bits)."""
    return _scores_of_curves(curves(df, metric))


def _scores_of_curves(c: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, g in c.groupby(GROUP, sort=False):
        if "scored" in g.columns and not g["scored"].iloc[0]:
            continue  # clean accuracy at chance: not scored (at_chance)
        axis = g["level_axis"].iloc[0]
        g = g[axis_scale(axis).scored(g["level"])]
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
                verdict=verdict(score),
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


# ------------------------------------------------------------------------------------ per-image measures

def _check_same_images(df: pd.DataFrame, outcomes: Outcomes, metric: str) -> None:
    """Refuse a model whose runs on one dataset kept outcomes for different images: the exact form of
    :func:`_check_one_clean_evaluation`, which sees only counts and accuracies (two subsets of one
    size can have one clean accuracy).

    Raises:
        LesionbenchError: naming the model, the dataset and how many images the runs share.
    """
    if "outcome" not in df.columns:
        return
    clean = df[(df["perturbation"] == CLEAN) & (df["outcome"] >= 0)]
    for (model, dataset), runs in clean.groupby(["model", "dataset"]):
        if len(runs) < 2:
            continue
        evaluated = _hits(outcomes, runs["outcome"].to_numpy(), metric)[1]
        if not (evaluated == evaluated[0]).all():
            counts = ", ".join(str(int(n)) for n in evaluated.sum(axis=1))
            raise _mixed_runs(model, dataset, f"has runs evaluated on different images ({counts} images, "
                              f"{int(evaluated.all(axis=0).sum())} in common)")  # fmt: skip


def _hits(outcomes: Outcomes, rows: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """For outcome rows ``rows``: (hit [rows, images] bool, evaluated [rows, images] bool).

    A text window's column (``tokens`` T > 1 in ``outcomes.images``) counts instead: hit is its
    number of top-k hits and evaluated T (int64), so that a sum of hits over a sum of evaluated
    (weighted or not) is the accuracy per token and a resampled column is a whole window."""
    top1 = outcomes.top1[rows]
    evaluated = top1 >= 0
    if metric == "top1":
        hit = top1 == outcomes.images["label"].to_numpy()[None, :]
    else:
        hit = outcomes.top5[rows].astype(bool)
    tokens = outcomes.images["tokens"].to_numpy() if "tokens" in outcomes.images.columns else None
    if tokens is None or not (tokens > 1).any():
        return hit & evaluated, evaluated
    counted = (tokens > 1)[None, :]
    counts = top1 if metric == "top1" else outcomes.top5[rows]
    hit = np.where(counted, counts, hit).astype(np.int64) * evaluated
    return hit, evaluated * tokens.astype(np.int64)[None, :]


def per_class_accuracy(df: pd.DataFrame, outcomes: Outcomes, metric: str = "top1") -> pd.DataFrame:
    """Accuracy on each class of the evaluation subset, per model × layer × perturbation × level.

    ``df`` is a results table with the ``outcome`` column that
    :func:`lesionbench.store.read_results_with_outcomes` (or ``lesionbench.load_outcomes``) adds,
    ``outcomes`` the per-image outcomes it points into. Returns one row per model × layer ×
    perturbation × level × class with ``class`` (int, the label), ``n_images`` (images of that
    class evaluated), ``accuracy`` (``metric`` on that class, mean over draws; a cell with
    non-finite logits is scored as measured, its NaN/Inf images counted wrong), ``clean`` (the undamaged model's
    accuracy on the class) and ``retention`` (clip((accuracy − chance) / (clean − chance), 0, 1),
    the per-class analogue of the retention curve; 0 where the clean model is at chance on the
    class). Rows without outcomes (runs made before they were kept, failed cells) are left out.
    Sorted by model, perturbation, layer_index, level, class.

    Per-class accuracy under damage is how "which classes are hurt most" is read (e.g. Hooker et
    al. 2019, *What do compressed deep neural networks forget?*, who compare per-class recall of
    pruned and dense models).
    """
    out_cols = GROUP + ["level", "class", "n_images", "accuracy", "clean", "retention"]
    if "outcome" not in df.columns or len(outcomes) == 0:
        return pd.DataFrame(columns=out_cols)
    error = df["error"].fillna("")
    usable = (df["outcome"] >= 0) & ((error == "") | (error == NONFINITE))
    clean = df[usable & (df["perturbation"] == CLEAN)].drop_duplicates(["model", "dataset"])
    cells = df[usable & (df["perturbation"] != CLEAN)]
    if cells.empty or clean.empty:
        return pd.DataFrame(columns=out_cols)
    labels = outcomes.images["label"].to_numpy()
    classes = np.unique(labels)
    onehot = (labels[:, None] == classes[None, :]).astype(np.float64)  # [images, classes]

    def by_class(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        hit, evaluated = _hits(outcomes, rows["outcome"].to_numpy(), metric)
        n = evaluated.astype(np.float64) @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            return hit.astype(np.float64) @ onehot / n, n

    acc, n = by_class(cells)
    long = cells[GROUP + ["level"]].loc[cells.index.repeat(len(classes))].reset_index(drop=True)
    long["class"] = np.tile(classes, len(cells))
    long["n_images"] = n.ravel()
    long["accuracy"] = acc.ravel()
    long = long[long["n_images"] > 0]
    out = long.groupby(GROUP + ["level", "class"], sort=True).agg(n_images=("n_images", "first"),
                                                                   accuracy=("accuracy", "mean")).reset_index()  # fmt: skip
    clean_acc, _ = by_class(clean)
    ref = pd.DataFrame({"model": clean["model"].repeat(len(classes)).to_numpy(),
                        "dataset": clean["dataset"].repeat(len(classes)).to_numpy(),
                        "class": np.tile(classes, len(clean)), "clean": clean_acc.ravel(),
                        "chance": np.repeat([chance_level(metric, int(k)) for k in clean["num_classes"]], len(classes))})  # fmt: skip
    out = out.merge(ref, on=["model", "dataset", "class"], how="left")
    out["retention"] = retention(out["accuracy"], out["clean"], out["chance"])
    out["n_images"] = out["n_images"].astype(int)
    return out.drop(columns="chance").sort_values(["model", "perturbation", "layer_index", "level", "class"],
                                                  ignore_index=True)[out_cols]  # fmt: skip


# ------------------------------------------------------------------------------------ bootstrap

REPLICATES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
METHOD = ("paired percentile bootstrap: images resampled with replacement once per replicate for every cell of a "
          "track (cells on the same images move together), draws resampled within each level with their full "
          "between-draw variance (Davison & Hinkley 1997, §3.8) and a Satterthwaite t factor per layer score; no "
          "interval for a single draw of a random damage")  # fmt: skip


@dataclass
class Bootstrap:
    """Bootstrap replicates of every score of a results table (see :func:`bootstrap`).

    ``layers`` is :func:`layer_scores` plus ``score_low``/``score_high`` and
    ``critical_low``/``critical_high`` (the 95% percentile interval; NaN where a model has no
    per-image outcomes); ``curves`` is :func:`curves` plus ``band_low``/``band_high``, the 95%
    interval of the mean accuracy at each level. ``score_reps`` (float64 [len(layers),
    replicates]) holds the layer-score replicates, NaN rows where there is no interval.
    """

    layers: pd.DataFrame
    curves: pd.DataFrame
    score_reps: np.ndarray
    replicates: int
    seed: int
    metric: str
    clean: dict = field(default_factory=dict)  # (model, dataset) -> clean accuracy replicates [replicates]

    def has_interval(self, model: str, dataset: str | None = None) -> bool:
        rows = self._rows(model, dataset)
        return bool(rows.size) and bool(np.isfinite(self.score_reps[rows]).all())

    def _rows(self, model: str, dataset: str | None = None, perturbations=None) -> np.ndarray:
        keep = self.layers["model"] == model
        if dataset is not None:
            keep &= self.layers["dataset"] == dataset
        if perturbations is not None:
            keep &= self.layers["perturbation"].isin(list(perturbations))
        return np.flatnonzero(keep.to_numpy())

    def overall_reps(self, model: str, dataset: str, perturbations) -> np.ndarray:
        """Replicates [replicates] of the model's overall score: the mean over ``perturbations`` of
        its mean layer score (NaN where there is no interval)."""
        per = []
        for p in perturbations:
            rows = self._rows(model, dataset, [p])
            if rows.size:
                per.append(self.score_reps[rows].mean(axis=0))
        return np.mean(per, axis=0) if per else np.full(self.replicates, np.nan)

    def overall(self, dataset: str, perturbations, models=None) -> pd.DataFrame:
        """Per model of ``dataset``: ``overall`` (mean over ``perturbations`` of the mean layer
        score), its interval ``low``/``high``, and ``rank``: 1 + the number of models whose overall
        score is higher with a paired-bootstrap 95% interval of the difference that excludes 0, so
        models that cannot be told apart share a rank (without intervals: ranked by the point value)."""
        s = self.layers[(self.layers["dataset"] == dataset) & self.layers["perturbation"].isin(list(perturbations))]
        models = list(models) if models is not None else sorted(s["model"].unique())
        point = {m: float(s[s["model"] == m].groupby("perturbation")["score"].mean().mean()) for m in models}
        reps = {m: self.overall_reps(m, dataset, perturbations) for m in models}
        rows = []
        for m in models:
            low, high = interval(reps[m])
            better = sum(self.better(point[o], reps[o], point[m], reps[m]) for o in models if o != m)
            rows.append(dict(model=m, overall=point[m], low=low, high=high, rank=1 + better))
        return pd.DataFrame(rows).sort_values(["rank", "overall"], ascending=[True, False], ignore_index=True)

    @staticmethod
    def better(point_a: float, reps_a: np.ndarray, point_b: float, reps_b: np.ndarray) -> bool:
        """Is a higher than b beyond doubt: the paired 95% interval of a − b lies above 0? Without
        replicates on either side, the point values decide."""
        if not (np.isfinite(reps_a).all() and np.isfinite(reps_b).all()):
            return point_a > point_b
        low, _high = interval(reps_a - reps_b)
        return bool(low > 0)

    def distinguishable(self, i: int, j: int) -> bool | None:
        """Do layer rows i and j of :attr:`layers` differ beyond doubt (paired interval of the
        difference excludes 0)? None without replicates."""
        a, b = self.score_reps[i], self.score_reps[j]
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return None
        low, high = interval(a - b)
        return bool(low > 0 or high < 0)


def interval(reps: np.ndarray, confidence: float = CONFIDENCE, axis: int = -1) -> tuple:
    """The percentile interval of bootstrap replicates (values actually drawn: no interpolation,
    so an infinite critical level stays infinite); NaN where any replicate is NaN."""
    reps = np.asarray(reps, dtype=float)
    if reps.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha], axis=axis, method="inverted_cdf")
    bad = np.isnan(reps).any(axis=axis)
    if np.ndim(low) == 0:
        return (float("nan"), float("nan")) if bad else (float(low), float(high))
    return np.where(bad, np.nan, low), np.where(bad, np.nan, high)


def bootstrap(df: pd.DataFrame, outcomes: Outcomes, metric: str = "top1", replicates: int = REPLICATES,
              seed: int = BOOTSTRAP_SEED) -> Bootstrap:  # fmt: skip
    """Confidence intervals for every score of a results table by a paired bootstrap.

    Each replicate draws the evaluation images with replacement — once for the whole track (one
    dataset), so every cell of every model evaluated on the same images is reweighted the same
    way and the curves move together — and draws each level's random draws with replacement;
    clean accuracy, curves, retention, layer scores, critical levels and overall scores are then
    recomputed from the reweighted accuracies. This is Efron's nonparametric bootstrap (Efron &
    Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13 for percentile intervals) with a
    two-stage (images, then draws) resampling of the two sources of randomness. The draw stage is
    Davison & Hinkley's adjusted one (``_resample_draws``), so 2 draws keep their full between-draw
    variance, widened by :func:`draw_quantile_factor` to a t quantile for the few degrees of freedom
    of that variance; a layer × perturbation with one draw per level of a random damage gets no
    interval (``_draw_variance_unknown``). ``layers["verdict"]`` is then :func:`verdict` of the
    score and its interval; models at chance (:func:`at_chance`) have no rows. Calibration against
    a known truth: :mod:`lesionbench.calibration`.

    ``df``: a results table with the ``outcome`` column of
    :func:`lesionbench.store.read_results_with_outcomes`; ``outcomes``: what it points into.
    A model × perturbation with a scored row lacking outcomes (an older run) gets no interval (NaN);
    the model's other perturbations keep theirs. Vectorised
    numpy: the accuracies of all cells under all replicates are one matrix product,
    [cells, images] × [images, replicates]. Same inputs and seed → same intervals.
    """
    if replicates < 2:
        raise LesionbenchError(f"bootstrap replicates must be at least 2, got {replicates}")
    df = df.reset_index(drop=True)  # rows are addressed by position below
    c = curves(df, metric)
    _check_same_images(df, outcomes, metric)
    scores = _scores_of_curves(c)
    B = replicates
    rng = np.random.default_rng(seed)
    error = df["error"].fillna("")
    cells = df[(df["perturbation"] != CLEAN) & ((error == "") | (error == NONFINITE))]
    have = df["outcome"] if "outcome" in df.columns else pd.Series(-1, index=df.index)
    # a model's clean row with outcomes where one of its runs kept them
    clean = df[df["perturbation"] == CLEAN].assign(_kept=have >= 0).sort_values("_kept", ascending=False, kind="stable")
    clean = clean.drop_duplicates(["model", "dataset"]).drop(columns="_kept")
    # a model × perturbation gets intervals when its every scored row has its per-image outcomes
    # (an older run without them leaves only its own perturbations without intervals)
    ok_rows = have.loc[cells.index] >= 0
    pair = pd.Series(list(zip(df["model"], df["perturbation"])), index=df.index)
    lacking = set(pair.loc[cells.index][~ok_rows]) | {(m, p) for m in clean.loc[have.loc[clean.index] < 0, "model"]
                                                      for p in df["perturbation"].unique()}  # fmt: skip
    rows = pd.concat([clean, cells])
    out = pair.loc[rows.index].isin(lacking) & (rows["perturbation"] != CLEAN)
    out |= rows["model"].isin(clean.loc[have.loc[clean.index] < 0, "model"])
    acc = np.full((len(rows), B), np.nan)
    for dataset in sorted(rows["dataset"].unique()):
        pick = np.flatnonzero(((rows["dataset"] == dataset) & ~out & (have.loc[rows.index] >= 0)).to_numpy())
        if pick.size == 0:
            continue
        hit, evaluated = _hits(outcomes, have.loc[rows.index].to_numpy()[pick], metric)
        used = evaluated.any(axis=0)
        hit, evaluated = hit[:, used].astype(np.float32), evaluated[:, used].astype(np.float32)
        n = hit.shape[1]
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=B).T.astype(np.float32)  # [images, B]
        with np.errstate(invalid="ignore", divide="ignore"):
            acc[pick] = (hit @ weights) / (evaluated @ weights)
    n_clean = len(clean)
    clean_reps = {(m, d): acc[i] for i, (m, d) in enumerate(zip(clean["model"], clean["dataset"]))}
    # curve points: draws resampled within each level
    group = cells.groupby(GROUP + ["level"], sort=True).ngroup().to_numpy()  # = the rows of c, in order
    # V_i = 0 in the factor (conservative): with the binomial V_i the fragile layer covered 0.93 (benchmarks/calibration.py)
    curve = _resample_draws(acc[n_clean:], group, len(c), rng, scale=draw_quantile_factor(c))
    curve[_draw_variance_unknown(c)] = np.nan  # no interval where one draw of a random damage is all there is
    band_low, band_high = interval(curve, axis=1)
    c = c.assign(band_low=band_low, band_high=band_high)
    # retention, then layer scores and critical levels, per replicate
    clean_of = np.array([clean_reps.get((m, d), np.full(B, np.nan)) for m, d in zip(c["model"], c["dataset"])]).reshape(len(c), B)
    chance = c["chance"].to_numpy()[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(clean_of - chance > 0, (curve - chance) / (clean_of - chance), 0.0)
    r = np.where(np.isnan(curve) | np.isnan(clean_of), np.nan, np.clip(r, 0.0, 1.0))
    score_reps, critical_reps = _layer_replicates(scores, c, r)
    s_low, s_high = interval(score_reps, axis=1)
    c_low, c_high = interval(critical_reps, axis=1)
    scores = scores.assign(score_low=s_low, score_high=s_high, critical_low=c_low, critical_high=c_high)
    scores["verdict"] = [verdict(*v) for v in zip(scores["score"], scores["score_low"], scores["score_high"])]
    return Bootstrap(scores, c, score_reps, B, seed, metric, clean_reps)


def _resample_draws(acc: np.ndarray, group: np.ndarray, n_groups: int, rng: np.random.Generator,
                    chunk: int = 4_000_000, adjust: bool = True, scale: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Mean over each group's draws, the draws resampled with replacement per replicate: [n_groups, B].

    ``adjust``: the resampled mean's deviation from the group's own mean is inflated by sqrt(d/(d−1))
    (d draws), Davison & Hinkley's adjusted two-stage resampling (1997, *Bootstrap Methods and their
    Application*, §3.8): plain resampling of d draws keeps only (d−1)/d of the between-draw variance
    (half at 2 draws), the adjusted one all of it. ``scale`` [n_groups]: a further factor per group
    (:func:`draw_quantile_factor`)."""
    B = acc.shape[1]
    out = np.full((n_groups, B), np.nan)
    order = np.argsort(group, kind="stable")
    sizes = np.bincount(group, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for d in np.unique(sizes[sizes > 0]):
        gs = np.flatnonzero(sizes == d)
        members = order[starts[gs][:, None] + np.arange(d)[None, :]]  # [groups, d] rows of acc
        if d == 1:
            out[gs] = acc[members[:, 0]]
            continue
        inflate = math.sqrt(d / (d - 1)) if adjust else 1.0
        inflate = inflate * (scale[gs] if scale is not None else np.ones(len(gs)))[:, None]  # [groups, 1]
        step = max(1, chunk // (B * d))
        for a in range(0, len(gs), step):
            m = members[a : a + step]
            pick = rng.integers(0, d, size=(len(m), B, d))
            rows = np.take_along_axis(np.broadcast_to(m[:, None, :], pick.shape), pick, axis=2)
            centre = acc[m, :].mean(axis=1)  # [groups, B]: the mean of the level's own draws
            drawn = acc[rows, np.arange(B)[None, :, None]].mean(axis=2)
            out[gs[a : a + step]] = centre + inflate[a : a + step] * (drawn - centre)
    return out


def draw_quantile_factor(c: pd.DataFrame, n_images: np.ndarray | None = None, confidence: float = CONFIDENCE) -> np.ndarray:
    """Per row of :func:`curves` ``c``: the widening of its draw deviations that turns the normal
    quantile of a percentile interval into Student's t with the layer score's degrees of freedom.

    A layer score is a weighted sum S = Σ w_l·mean_l over its levels (trapezoid weights w_l). Its
    between-draw variance V_d = Σ w_l²·s_l²/d_l is estimated from the d_l draws of each level, with
    d_l − 1 degrees of freedom each (draw effects of different levels are independent); its image
    variance V_i ≈ Σ w_l²·m_l(1 − m_l)/n (``n_images`` [len(c)], the binomial variance of each level's
    mean accuracy m_l) is estimated from many images, with unbounded degrees of freedom. The total
    has Satterthwaite's (1946, *Biometrics Bulletin* 2:110) ν = (V_i + V_d)² / Σ (w_l²·s_l²/d_l)² /
    (d_l − 1), and the draw deviations are widened by f with z²·(V_i + f²·V_d) = t(ν)²·(V_i + V_d), so
    the interval's half-width is t(ν) standard errors. Without ``n_images``, V_i = 0 (the most
    conservative). Levels with one draw add nothing; a layer without draw variance gets 1. Returns
    float64 [len(c)].
    """
    from scipy import stats  # here: importing lesionbench does not load scipy

    z = stats.norm.ppf(0.5 + confidence / 2)
    factor = np.ones(len(c))
    n_all = np.full(len(c), np.inf) if n_images is None else np.asarray(n_images, dtype=float)
    for _key, idx in c.groupby(GROUP, sort=False).indices.items():
        g = c.iloc[idx]
        keep = axis_scale(g["level_axis"].iloc[0]).scored(g["level"])
        x = to_axis(g["level"].to_numpy()[keep], g["level_axis"].iloc[0])
        if len(x) < 1:
            continue
        order = np.argsort(x, kind="stable")
        xs = x[order]
        w = np.ones(1) if len(xs) == 1 or xs[-1] == xs[0] else np.diff(np.concatenate([[xs[0]], (xs[1:] + xs[:-1]) / 2, [xs[-1]]]))
        weights = np.zeros(len(x))
        weights[order] = w
        n = g["n"].to_numpy()[keep].astype(float)
        part = weights**2 * g["std"].to_numpy()[keep] ** 2 / n
        m = g["mean"].to_numpy()[keep]
        v_images = float((weights**2 * m * (1 - m) / n_all[idx][keep]).sum())
        multi = n > 1
        denom = (part[multi] ** 2 / (n[multi] - 1)).sum()
        v_draws = part[multi].sum()
        if denom <= 0 or v_draws <= 0:
            continue
        nu = (v_images + v_draws) ** 2 / denom
        ratio = (stats.t.ppf(0.5 + confidence / 2, nu) / z) ** 2
        factor[idx] = math.sqrt(max(1.0, (ratio * (v_images + v_draws) - v_images) / v_draws))
    return factor


def _draw_variance_unknown(c: pd.DataFrame) -> np.ndarray:
    """Rows of :func:`curves` ``c`` whose layer × perturbation has a single draw at every level although
    its damage is random (not a ``deterministic`` perturbation): the between-draw variance, which can
    be as large as the images', cannot be estimated, so the layer gets no interval and no significance
    call rather than one that holds the images' variance only. A perturbation the installed plugins do
    not know counts as random."""
    single = c.groupby(GROUP, sort=False)["n"].transform("max").to_numpy() <= 1
    if not single.any():
        return single
    try:
        from lesionbench.registry import get_registry

        known = get_registry().contributions("perturbations")
    except Exception:  # noqa: BLE001 - a broken plugin must not stop scoring; unknown counts as random
        known = {}
    fixed = {name for name, contribution in known.items() if getattr(contribution.obj, "deterministic", False)}
    return single & ~c["perturbation"].str.split("+").str[0].isin(fixed).to_numpy()  # "quantize+bn_recalibrate"


def _layer_replicates(scores: pd.DataFrame, c: pd.DataFrame, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Layer score and critical level per replicate, for each row of ``scores``, from retention
    replicates ``r`` [len(c), B]: the same trapezoid area and first crossing of 0.5 as
    :func:`area_score` / :func:`critical_level`, on padded arrays [layers, levels, B]."""
    B = r.shape[1]
    index = {k: np.asarray(v) for k, v in c.groupby(GROUP, sort=False).indices.items()}
    members, xs, axes = [], [], []
    for row in scores[GROUP + ["level_axis"]].itertuples(index=False):
        idx = index[tuple(row[:-1])]
        axis = row[-1]
        levels = c["level"].to_numpy()[idx]
        scored = axis_scale(axis).scored(levels)
        idx, levels = idx[scored], levels[scored]
        x = to_axis(levels, axis)
        order = np.argsort(x, kind="stable")
        members.append(idx[order])
        xs.append(x[order])
        axes.append(axis)
    L = len(members)
    if L == 0:
        return np.zeros((0, B)), np.zeros((0, B))
    K = max(len(m) for m in members)
    pad = np.stack([np.concatenate([m, np.repeat(m[-1:], K - len(m))]) for m in members])  # [L, K]
    x = np.stack([np.concatenate([v, np.repeat(v[-1:], K - len(v))]) for v in xs])
    rr = r[pad]  # [L, K, B]; padding repeats the last point: zero-width segments, no new crossing
    width = (x[:, -1] - x[:, 0])[:, None]
    seg = np.diff(x, axis=1)[:, :, None] * (rr[:, 1:] + rr[:, :-1]) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        area = np.where(width > 0, seg.sum(axis=1) / np.where(width > 0, width, 1.0), rr.mean(axis=1))
    single = np.array([len(m) for m in members]) == 1
    area[single] = rr[single, 0]
    below = rr <= 0.5
    first = below.argmax(axis=1)  # [L, B]
    ever = below.any(axis=1)
    prev = np.maximum(first - 1, 0)
    take = lambda a, i: np.take_along_axis(a, i[:, None, :], axis=1)[:, 0]  # noqa: E731
    x_b = np.broadcast_to(x[:, :, None], rr.shape)
    x0, x1, y0, y1 = take(x_b, prev), take(x_b, first), take(rr, prev), take(rr, first)
    with np.errstate(invalid="ignore", divide="ignore"):
        cross = np.where(first == 0, x1, x0 + (y0 - 0.5) * (x1 - x0) / (y0 - y1))
    cross = np.where(ever, cross, np.inf)
    cross = np.where(np.isnan(rr).any(axis=1), np.nan, cross)
    critical = np.empty_like(cross)
    for i, axis in enumerate(axes):
        critical[i] = axis_scale(axis).from_coord(cross[i])  # never reached stays +inf
    return area, critical
