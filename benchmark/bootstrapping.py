"""Confidence intervals for every score of a results table: the paired bootstrap over images and draws.

Every replicate goes through the same score (:mod:`lesionbench.layer_score`) as the point
estimate, so the replicate that resamples nothing (``resample="identity"``) is the point estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lesionbench.errors import LesionbenchError
from lesionbench.kinds import axis_scale
from lesionbench.layer_score import DEFAULT_SCORE, Score, get_score, layer_values
from lesionbench.per_image import _check_same_images, _hits
from lesionbench.scores import GROUP, _scores_of_curves, curves, levels_of, to_axis, verdict
from lesionbench.store import CLEAN, NONFINITE, Outcomes

REPLICATES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
METHOD = (
    "paired percentile bootstrap: images resampled with replacement once per replicate for every cell of a "
    "track (cells on the same images move together), draws resampled within each level with their full "
    "between-draw variance (Davison & Hinkley 1997, §3.8) and a Satterthwaite t factor per layer score; no "
    "interval for a single draw of a random damage"
)


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
    score: str = DEFAULT_SCORE  # the layer score (lesionbench list scores)

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


class Resample:
    """Where a replicate's resamples come from: ``random`` (the bootstrap, from ``rng``) or
    ``identity`` (every image once, every draw once: each replicate is the original sample, so it
    reproduces the point estimate; for checks)."""

    def __init__(self, rng: np.random.Generator, identity: bool = False) -> None:
        self.rng, self.identity = rng, identity

    def images(self, n: int, B: int) -> np.ndarray:
        """How often each of ``n`` images is drawn in each replicate: float32 [n, B]."""
        if self.identity:
            return np.ones((n, B), np.float32)
        return self.rng.multinomial(n, np.full(n, 1.0 / n), size=B).T.astype(np.float32)

    def draws(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Which of d draws each replicate takes, int [groups, B, d] with ``shape`` (groups, B, d)."""
        if self.identity:
            return np.broadcast_to(np.arange(shape[2]), shape)
        return self.rng.integers(0, shape[2], size=shape)


def bootstrap(
    df: pd.DataFrame,
    outcomes: Outcomes,
    metric: str = "top1",
    replicates: int = REPLICATES,
    seed: int = BOOTSTRAP_SEED,
    score: str | Score = DEFAULT_SCORE,
    resample: str = "random",
) -> Bootstrap:
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
    chosen = get_score(score)
    scores = _scores_of_curves(c, chosen)
    if resample not in ("random", "identity"):
        raise LesionbenchError(f"resample must be 'random' or 'identity', got {resample!r}")
    B = replicates
    rng = Resample(np.random.default_rng(seed), identity=resample == "identity")
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
    lacking = set(pair.loc[cells.index][~ok_rows]) | {
        (m, p) for m in clean.loc[have.loc[clean.index] < 0, "model"] for p in df["perturbation"].unique()
    }
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
        weights = rng.images(n, B)  # [images, B]
        with np.errstate(invalid="ignore", divide="ignore"):
            acc[pick] = (hit @ weights) / (evaluated @ weights)
    n_clean = len(clean)
    clean_reps = {(m, d): acc[i] for i, (m, d) in enumerate(zip(clean["model"], clean["dataset"]))}
    # curve points: draws resampled within each level
    group = cells.groupby(GROUP + ["level"], sort=True).ngroup().to_numpy()  # = the rows of c, in order
    # V_i = 0 in the factor (conservative): with the binomial V_i the fragile layer covered 0.93 (perf/calibration.py)
    curve = _resample_draws(acc[n_clean:], group, len(c), rng, scale=draw_quantile_factor(c))
    curve[_draw_variance_unknown(c)] = np.nan  # no interval where one draw of a random damage is all there is
    band_low, band_high = interval(curve, axis=1)
    c = c.assign(band_low=band_low, band_high=band_high)
    # retention, then layer scores and critical levels, per replicate
    clean_of = np.array([clean_reps.get((m, d), np.full(B, np.nan)) for m, d in zip(c["model"], c["dataset"])]).reshape(
        len(c), B
    )
    chance = c["chance"].to_numpy()[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(clean_of - chance > 0, (curve - chance) / (clean_of - chance), 0.0)
    r = np.where(np.isnan(curve) | np.isnan(clean_of), np.nan, np.clip(r, 0.0, 1.0))
    score_reps, critical_reps = _layer_replicates(scores, c, r, chosen)
    s_low, s_high = interval(score_reps, axis=1)
    c_low, c_high = interval(critical_reps, axis=1)
    scores = scores.assign(score_low=s_low, score_high=s_high, critical_low=c_low, critical_high=c_high)
    scores["verdict"] = [verdict(*v) for v in zip(scores["score"], scores["score_low"], scores["score_high"])]
    return Bootstrap(scores, c, score_reps, B, seed, metric, clean_reps, chosen.name)


def _resample_draws(
    acc: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    rng: Resample,
    chunk: int = 4_000_000,
    adjust: bool = True,
    scale: np.ndarray | None = None,
) -> np.ndarray:
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
            pick = rng.draws((len(m), B, d))
            rows = np.take_along_axis(np.broadcast_to(m[:, None, :], pick.shape), pick, axis=2)
            centre = acc[m, :].mean(axis=1)  # [groups, B]: the mean of the level's own draws
            drawn = acc[rows, np.arange(B)[None, :, None]].mean(axis=2)
            out[gs[a : a + step]] = centre + inflate[a : a + step] * (drawn - centre)
    return out


def _t_over_z(nu: float, confidence: float) -> float:
    """Student's t quantile with ``nu`` degrees of freedom over the normal quantile, at the two-sided
    ``confidence``. scipy is imported here: importing lesionbench, or a study of single draws, does
    not load it."""
    from scipy import stats

    q = 0.5 + confidence / 2
    return float(stats.t.ppf(q, nu) / stats.norm.ppf(q))


def draw_quantile_factor(
    c: pd.DataFrame, n_images: np.ndarray | None = None, confidence: float = CONFIDENCE
) -> np.ndarray:
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
    float64 [len(c)]. scipy (for t) is imported only where a level has two draws or more.
    """
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
        w = (
            np.ones(1)
            if len(xs) == 1 or xs[-1] == xs[0]
            else np.diff(np.concatenate([[xs[0]], (xs[1:] + xs[:-1]) / 2, [xs[-1]]]))
        )
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
        ratio = _t_over_z(nu, confidence) ** 2
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


def _layer_replicates(
    scores: pd.DataFrame, c: pd.DataFrame, r: np.ndarray, score: Score
) -> tuple[np.ndarray, np.ndarray]:
    """Layer score and critical level per replicate, for each row of ``scores``, from retention
    replicates ``r`` [len(c), B]: :func:`lesionbench.layer_score.layer_values`, as for the point
    estimate, on the replicates of each layer's curve [levels, B]."""
    B = r.shape[1]
    index = {k: np.asarray(v) for k, v in c.groupby(GROUP, sort=False).indices.items()}
    area, critical = np.zeros((len(scores), B)), np.zeros((len(scores), B))
    for i, row in enumerate(scores[GROUP + ["level_axis"]].itertuples(index=False)):
        idx, axis = index[tuple(row[:-1])], row[-1]
        levels = c["level"].to_numpy()[idx]
        scored = axis_scale(axis).scored(levels)
        idx, levels = idx[scored], levels[scored]
        area[i], positions = layer_values(score, to_axis(levels, axis), r[idx], axis_scale(axis).undamaged(levels))
        critical[i] = levels_of(positions, axis)
    return area, critical
