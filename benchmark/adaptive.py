"""Adaptive draws: more draws where a level's mean metric is still uncertain (a study's ``target_ci``).

The policy only: given the draws a block's levels have had and their values, how many to add. The
plan (:meth:`lesionbench.plan.Plan.extra_cells`, :meth:`~lesionbench.plan.Plan.settled`) asks it
for a block's next cells; every executor runs them. Draw k is the cell it would be without
adaptivity (same seed), so the decision depends on the values alone: deterministic and resumable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar


class _Drawn(Protocol):
    level: float
    draw: int


C = TypeVar("C", bound=_Drawn)


def extra_draws(values: list[float], target: float, cap: int) -> int:
    """How many draws to add to a level whose ``len(values)`` draws gave ``values`` (NaN: failed).

    0 when the 95% t-interval of their mean, 2·t(0.975, n−1)·s/√n over the finite values, is
    narrower than ``target``, or ``cap`` draws were made; else enough to bring the interval under
    ``target`` at the current spread (at least one), capped at ``cap``."""
    n = len(values)
    finite = [v for v in values if math.isfinite(v)]
    if n >= cap or len(finite) < 2:
        return 0
    import numpy as np
    from scipy import stats  # here: a study without adaptive draws never loads scipy

    s = float(np.std(finite, ddof=1))
    t = float(stats.t.ppf(0.975, len(finite) - 1))
    if 2 * t * s / math.sqrt(len(finite)) < target:
        return 0
    needed = math.ceil((2 * t * s / target) ** 2)
    return min(cap, max(n + 1, needed)) - n


def extra_cells(cells: Sequence[C], values: Mapping[tuple[float, int], float], target: float, cap: int) -> list[C]:
    """The draws to add to a block whose cells (dataclasses with ``level`` and ``draw``) so far are
    ``cells``, with metric ``values`` by (level, draw) (a cell missing or NaN there — failed — counts
    as a draw made but not as a value).

    Per level: while the 95% t-interval of the mean over its draws is not narrower than ``target``
    and fewer than ``cap`` draws were made, add the draws :func:`extra_draws` says are needed (at
    least one), numbered after the last draw made. A level with one cell (the identity level, a
    deterministic perturbation) gets none."""
    by_level: dict[float, list[C]] = {}
    for c in cells:
        by_level.setdefault(c.level, []).append(c)
    out = []
    for made in by_level.values():
        if len(made) < 2:  # the identity level, a deterministic perturbation: one draw says it all
            continue
        add = extra_draws([values.get((c.level, c.draw), math.nan) for c in made], target, cap)
        first = max(c.draw for c in made) + 1
        out += [replace(made[0], draw=first + k) for k in range(add)]
    return out
