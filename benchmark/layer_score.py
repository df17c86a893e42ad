"""Layer scores as a plugin kind: the one place a retention curve becomes a layer's numbers.

A :class:`Score` (contributed through the ``lesionbench_scores`` hook, kind ``scores``) maps a
retention curve to one number per curve; :func:`layer_values` applies it and finds the critical
level, for the point estimate (one curve) and for every bootstrap replicate at once (one curve per
replicate) alike, so each score's maths exists once and the point estimate is by construction the
bootstrap's identity replicate. The default, ``area`` (:class:`AreaScore`, contributed by the
built-in plugin ``area_score``), is the layer-robustness score of :mod:`lesionbench.scores`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from lesionbench.errors import LesionbenchError

if TYPE_CHECKING:
    from lesionbench.registry import Registry

DEFAULT_SCORE = "area"
THRESHOLD = 0.5  # retention at the critical level; a layer is critical when its (grid-rescaled) score is below it


@runtime_checkable
class Score(Protocol):
    """The contract of a ``scores`` contribution.

    ``of(x, r)``: ``x`` float64 [levels], the positions of the levels on the scoring axis, strictly
    increasing, damage growing to the right (log10 of the level for a log axis, minus the level for
    a descending one); ``r`` float64 [levels, curves], retention in [0, 1] (NaN where a replicate
    has no value). Returns float64 [curves], one score per curve (NaN where its curve has NaN); a
    score in [0, 1] with 1 = robust keeps the verdicts' threshold (0.50) meaningful.
    """

    name: str
    description: str

    def of(self, x: np.ndarray, r: np.ndarray) -> np.ndarray: ...


class AreaScore:
    """The area under retention over the level range, divided by the range (trapezoids); a single
    level (or a range of width 0) scores the mean retention. 1: the damage never cost accuracy; 0:
    chance at every level (:func:`layer_values` rescales it on a grid holding an undamaged level, so
    that 0 means chance at every damaged level there too). Source: the layer-robustness score of this
    benchmark (README; docs/explanation/scores-on-any-grid.md)."""

    name = DEFAULT_SCORE
    description = "Area under the retention curve over the level range, divided by the range (the default)."

    def of(self, x: np.ndarray, r: np.ndarray) -> np.ndarray:
        if len(x) == 1 or x[-1] == x[0]:
            return r.mean(axis=0)
        return np.trapezoid(r, x, axis=0) / (x[-1] - x[0])


def critical_positions(x: np.ndarray, r: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Where each curve of ``r`` [levels, curves] first falls to ``threshold``, on the axis ``x``
    [levels] (increasing): linear interpolation between the two levels around the crossing, the
    first level when it starts there, +inf when it never falls, NaN when the curve has NaN.
    Returns float64 [curves]."""
    x, r = np.asarray(x, dtype=float), np.asarray(r, dtype=float)
    below = r <= threshold
    first = below.argmax(axis=0)
    prev = np.maximum(first - 1, 0)
    cols = np.arange(r.shape[1])
    x0, x1, y0, y1 = x[prev], x[first], r[prev, cols], r[first, cols]
    with np.errstate(invalid="ignore", divide="ignore"):
        cross = np.where(first == 0, x1, x0 + (y0 - threshold) * (x1 - x0) / (y0 - y1))
    cross = np.where(below.any(axis=0), cross, np.inf)
    return np.where(np.isnan(r).any(axis=0), np.nan, cross)


def grid_extremes(score: Score, x: np.ndarray, undamaged: np.ndarray) -> tuple[float, float]:
    """What ``score`` gives, on the level grid ``x`` [levels] (increasing), to the two extreme curves:
    chance at every damaged level (retention 1 at the ``undamaged`` levels, bool [levels], 0 at the
    others) and no loss anywhere (1 everywhere). Returns (floor, ceiling) as floats."""
    ends = np.stack([np.asarray(undamaged, dtype=float), np.ones(len(x))], axis=1)  # [levels, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        floor, ceiling = (float(v) for v in np.asarray(score.of(x, ends), dtype=float))
    return floor, ceiling


def layer_values(
    score: Score, x: np.ndarray, r: np.ndarray, undamaged: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(score [curves], critical position [curves]) of the curves ``r`` [levels, curves] on ``x``.

    ``x`` need not be sorted: both are put in increasing order of ``x`` (stable) first.
    ``undamaged``, bool [levels] (in the order of ``x`` as given): the levels that do no damage
    (level 0 of an axis on which damage grows, :meth:`lesionbench.kinds.AxisScale.undamaged`), where
    retention is 1 by definition. When the grid has one, the score is rescaled so that it means the
    same on every grid: s' = (s − floor) / (ceiling − floor), with floor and ceiling what the score
    gives to "chance at every damaged level" and to "no loss" on this grid (:func:`grid_extremes`),
    clipped to [0, 1]. Without it, the area score of the grid (0, 1) would be (1 + r)/2, never below
    0.50 however harmful the damage, and of (0, 0.1, …, 1) 0.05 at the least; rescaled, both are 0
    when every damaged level is at chance and 1 when none costs accuracy (docs/explanation/scores-on-any-grid.md).
    A grid with no undamaged level (log axes, bit widths) is left as it is: its floor is already 0.

    Raises:
        LesionbenchError: the score returned something else than one finite-or-NaN number per curve.
    """
    x, r = np.asarray(x, dtype=float), np.asarray(r, dtype=float)
    order = np.argsort(x, kind="stable")
    x, r = x[order], r[order]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.asarray(score.of(x, r), dtype=float)
    if values.shape != (r.shape[1],):
        raise LesionbenchError(
            f"score {score.name!r} returned shape {values.shape} for {r.shape[1]} curves, not ({r.shape[1]},)"
        )
    if undamaged is not None:
        undamaged = np.asarray(undamaged, dtype=bool)[order]
        if undamaged.any() and not undamaged.all():
            floor, ceiling = grid_extremes(score, x, undamaged)
            if ceiling > floor:
                values = np.clip((values - floor) / (ceiling - floor), 0.0, 1.0)
    values = np.where(np.isnan(r).any(axis=0), np.nan, values)
    return values, critical_positions(x, r)


def get_score(name: str | Score = DEFAULT_SCORE, registry: Registry | None = None) -> Score:
    """The score called ``name`` in the registry (a :class:`Score` object is returned as it is).

    Raises:
        LesionbenchError: an unknown name, the registered scores listed.
    """
    if not isinstance(name, str):
        return name
    from lesionbench.registry import get_registry

    return (registry or get_registry()).get("scores", name)
