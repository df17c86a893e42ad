"""The two kinds a perturbation declares, as types that own their behaviour.

- :class:`PerturbationKind` — how the damage is done: :data:`WEIGHTS` (in place, on the layer's stored
  tensors) or :data:`HOOKS` (forward hooks on what the layer computes). It applies a perturbation in a
  cell (:meth:`PerturbationKind.start`) and says whether the damage is in the tensors alone.
- :class:`AxisScale` — how a level axis is read: :data:`LINEAR`, :data:`LOG` (error rates spanning
  decades, scored over log10 p) or :data:`DESCENDING` (fewer is worse: bit widths). It maps levels to
  the scoring coordinate and back, formats levels and the "never reached" critical level, and places
  levels on a plot. Results record its :attr:`AxisScale.name` in their ``level_axis`` column.

Both compare equal to their old string values (``"weights"``, ``"hooks"``; ``"linear"``, ``"log"``,
``"descending"``), and :func:`perturbation_kind` / :func:`axis_scale` map those strings to the types,
so plugins written for lesionbench 0.1 keep working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from lesionbench.errors import LesionbenchError


class _Named:
    """A singleton type compared by its ``name``, and equal to that string (the values of 0.1)."""

    name: ClassVar[str] = ""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# ------------------------------------------------------------------------------------ perturbation kinds


class PerturbationKind(_Named):
    """How a perturbation damages a layer: the method it must define and how a cell applies it."""

    method: ClassVar[str] = ""  # the perturbation's method this kind calls
    hooked: ClassVar[bool] = False  # True: the damage is in forward hooks, not in the layer's tensors

    def start(self, perturbation: Any, layer: Any, level: float, generator: Any) -> list:
        """Apply ``perturbation`` to ``layer`` at ``level``; return the hook handles to remove after the cell."""
        raise NotImplementedError


class WeightsKind(PerturbationKind):
    """Damage to the layer's stored tensors, in place, by ``apply(layer, level, generator)``."""

    name = "weights"
    method = "apply"

    def start(self, perturbation: Any, layer: Any, level: float, generator: Any) -> list:
        layer.merge_adapters()  # a LoRA layer: damage acts on its effective weight
        perturbation.apply(layer, level, generator)
        return []


class HooksKind(PerturbationKind):
    """Damage to what the layer computes, by the forward hooks ``hooks(layer, level, generator)`` installs."""

    name = "hooks"
    method = "hooks"
    hooked = True

    def start(self, perturbation: Any, layer: Any, level: float, generator: Any) -> list:
        return list(perturbation.hooks(layer, level, generator) or [])


WEIGHTS = WeightsKind()
HOOKS = HooksKind()
PERTURBATION_KINDS: dict[str, PerturbationKind] = {k.name: k for k in (WEIGHTS, HOOKS)}


def perturbation_kind(value: object) -> PerturbationKind:
    """The :class:`PerturbationKind` a perturbation's ``kind`` names (a kind, or ``"weights"``/``"hooks"``).

    Raises LesionbenchError for anything else."""
    if isinstance(value, PerturbationKind):
        return value
    if isinstance(value, str) and value in PERTURBATION_KINDS:
        return PERTURBATION_KINDS[value]
    raise LesionbenchError(f"unknown perturbation kind {value!r} (the kinds are {', '.join(PERTURBATION_KINDS)})")


# ------------------------------------------------------------------------------------ level-axis scales


def format_level(x: float) -> str:
    """A level as a tick label or table entry: powers of ten below 0.01 as ``1e-6``, others as ``%g``."""
    if 0 < x < 0.01:
        exponent = round(math.log10(x))
        if math.isclose(x, 10.0**exponent, rel_tol=1e-9):
            return f"1e{exponent}"
    return f"{x:g}"


class AxisScale(_Named):
    """How the levels of one axis are read. Subclasses override the coordinate maps.

    The *scoring coordinate* is where damage grows from left to right and where the layer score
    integrates retention (the level itself, log10 of it, or its negative).
    """

    note: ClassVar[str] = ""  # what listings add to the axis label ("log scale"…)
    plot_scale: ClassVar[str] = "linear"  # matplotlib's x-scale name

    def scored(self, levels: Sequence[float] | np.ndarray) -> np.ndarray:
        """bool [len(levels)]: the levels that have a place on the scoring coordinate (all, on most axes)."""
        return np.ones(len(np.asarray(levels)), dtype=bool)

    def undamaged(self, levels: Sequence[float] | np.ndarray) -> np.ndarray:
        """bool [len(levels)]: the levels that do no damage, where retention is 1 by definition: level 0
        on an axis where damage grows from 0 (a fraction, a σ multiple, a count); none where fewer is
        worse (bit widths). The layer score is rescaled by them (:func:`lesionbench.layer_score.layer_values`)."""
        return np.asarray(levels, dtype=float) == 0

    def to_coord(self, levels: Sequence[float] | np.ndarray) -> np.ndarray:
        """float64 [len(levels)]: positions on the scoring coordinate."""
        return np.asarray(levels, dtype=float)

    def from_coord(self, x: float | np.ndarray) -> float | np.ndarray:
        """The level at coordinate ``x`` (a float or an array); ±inf and NaN are kept as they are."""
        return x if np.ndim(x) else float(x)

    def beyond(self, max_level: float) -> str:
        """A critical level never reached within the studied levels: ``"> 1"`` (``"< 2"`` when fewer is worse)."""
        return f"> {max_level:g}"

    def plot_positions(self, levels: Sequence[float] | np.ndarray) -> tuple[np.ndarray, float | None]:
        """float64 x positions of ``levels`` on a plot, and where the clean level 0 was placed (None: at 0)."""
        return np.asarray(levels, dtype=float), None

    def style_plot_axis(self, ax: Any, clean_x: float | None, levels: Sequence[float]) -> None:
        """Set a matplotlib x axis's scale, direction and ticks for these levels (damage grows rightwards);
        ``clean_x`` is what :meth:`plot_positions` returned. A linear axis is left as matplotlib made it."""


class LinearScale(AxisScale):
    """Levels read as they are (fractions, σ multiples)."""

    name = "linear"


class DescendingScale(AxisScale):
    """Fewer is worse (bit widths): the coordinate is −level, the plot's x axis runs from many to few."""

    name = "descending"
    note = "damage grows as it falls"

    def undamaged(self, levels: Sequence[float] | np.ndarray) -> np.ndarray:
        return np.zeros(len(np.asarray(levels)), dtype=bool)

    def to_coord(self, levels: Sequence[float] | np.ndarray) -> np.ndarray:
        return -np.asarray(levels, dtype=float)

    def from_coord(self, x: float | np.ndarray) -> float | np.ndarray:
        moved = np.where(np.isinf(x), x, -np.asarray(x, dtype=float))  # never reached stays +inf
        return moved if np.ndim(x) else float(moved)

    def beyond(self, max_level: float) -> str:
        return f"< {max_level:g}"

    def style_plot_axis(self, ax: Any, clean_x: float | None, levels: Sequence[float]) -> None:
        ax.invert_xaxis()


class LogScale(AxisScale):
    """Error rates spanning decades: scored over log10 p, so every decade weighs the same; level 0 (the
    clean model) has no place on the coordinate and is drawn a gap to the left of the smallest level."""

    name = "log"
    note = "log scale"
    plot_scale = "log"

    def scored(self, levels: Sequence[float] | np.ndarray) -> np.ndarray:
        return np.asarray(levels, dtype=float) > 0

    def to_coord(self, levels: Sequence[float] | np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log10(np.asarray(levels, dtype=float))

    def from_coord(self, x: float | np.ndarray) -> float | np.ndarray:
        with np.errstate(over="ignore"):
            moved = np.where(np.isinf(x), x, 10.0 ** np.asarray(x, dtype=float))  # never reached stays +inf
        return moved if np.ndim(x) else float(moved)

    def plot_positions(self, levels: Sequence[float] | np.ndarray) -> tuple[np.ndarray, float | None]:
        levels = np.asarray(levels, dtype=float)
        positive = levels[levels > 0]
        if not len(positive):
            return np.ones_like(levels), 1.0
        decades = math.log10(positive.max() / positive.min())
        clean_x = positive.min() / 10 ** max(1.0, decades / 4)  # a gap of a quarter of the span, at least a decade
        return np.where(levels > 0, levels, clean_x), float(clean_x)

    def style_plot_axis(self, ax: Any, clean_x: float | None, levels: Sequence[float]) -> None:
        """A log x axis; the clean point gets a tick "0" and a "//" break before the first level."""
        ax.set_xscale("log")
        positive = sorted({float(x) for x in levels if x > 0})
        ticks = positive if len(positive) <= 6 else positive[:: math.ceil(len(positive) / 6)]
        if clean_x is None:
            ax.set_xticks(ticks, [format_level(t) for t in ticks])
            return
        ax.set_xticks([clean_x, *ticks], ["0", *(format_level(t) for t in ticks)])
        ax.minorticks_off()
        if positive:  # the log axis has no 0: mark the gap between the clean point and the first level
            gap = math.sqrt(clean_x * positive[0])
            ax.text(
                gap,
                0,
                "//",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="center",
                fontsize=9,
                clip_on=False,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.5),
            )


LINEAR = LinearScale()
LOG = LogScale()
DESCENDING = DescendingScale()
AXIS_SCALES: dict[str, AxisScale] = {s.name: s for s in (LINEAR, LOG, DESCENDING)}


def axis_scale(value: object) -> AxisScale:
    """The :class:`AxisScale` that ``value`` names: a scale, or what results record in ``level_axis``
    (``"linear"``, ``"log"``, ``"descending"``; ``""`` reads as linear, as in files from before the column).

    Raises LesionbenchError for anything else."""
    if isinstance(value, AxisScale):
        return value
    if value == "" or value is None:
        return LINEAR
    if isinstance(value, str) and value in AXIS_SCALES:
        return AXIS_SCALES[value]
    raise LesionbenchError(f"unknown level axis {value!r} (the axes are {', '.join(AXIS_SCALES)})")
