"""How the leaderboard writes its numbers and names as text: shared by the Markdown reporter, the
terminal summary (``lesionbench.cli.report``) and ``lesionbench compare``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and pandas load on first use: the reporters are plugins, loaded by `lesionbench list`
    import pandas as pd

# The leaderboard's fixed prose (Markdown emphasis; the HTML reporter turns it into tags).
HOW_TO_READ = (
    "**Layer-robustness score**: area under the retention curve r(p) = clip((acc(p) − chance) / "
    "(acc(0) − chance), 0, 1) over the level range, divided by the range, rescaled so that on every level "
    "grid 1 means the layer's damage never cost accuracy and 0 means chance at every damaged level (retention "
    "c at every damaged level scores c; on the grid (0, 1) the score is the retention at 1). Its weighting "
    "depends on the grid, so models are ranked only on perturbations run with the same grid. **p½**: the level where r "
    "first falls to 0.5. **Verdicts**: a layer is *critical* when its score's 95% interval lies below 0.50 "
    "(printed **bold**), *robust* when it lies at or above 0.50, *undetermined* when it contains 0.50 (printed "
    "_italic_); without an interval, from the score alone. A model whose clean accuracy is not beyond chance "
    "(one-sided binomial test, level 0.05) is not scored."
)
INTERVALS = (
    "**Intervals**: 95%, by a {method}; {replicates} replicates, seed {seed} "
    "(`lesionbench.scores.bootstrap`). Models share a rank when the paired bootstrap interval of the "
    "difference of their overall scores includes 0 (rank = 1 + the models ahead beyond doubt). Scores "
    "without an interval come from runs made before per-image outcomes were kept, or from a single draw "
    "per level of a random damage (its between-draw variance cannot be estimated); models without one are "
    "ranked by the point value, not beyond doubt."
)
NO_INTERVALS = (
    "**Intervals**: none — these runs were made before per-image outcomes (`outcomes.arrow`) were kept; "
    "a run made now gets a 95% paired-bootstrap interval on every score."
)
COLUMNS_NOTE = (
    "Overall: mean over the ranked perturbations of the mean layer score. Weakest layer, first / last layer "
    "(mean over the ranked perturbations), images × draws (evaluation images × random draws per level) and "
    "study time (all evaluations under the ranked perturbations) use the same perturbations; images/s: a "
    "full clean pass."
)

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~])")


def md(text: object) -> str:
    """Escape a name for a Markdown table cell: names come from models and plugins, not from us."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def fmt(x: float | None, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, or an en dash for a missing number (None, NaN)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_critical(value: float, max_level: float, axis: str = "linear") -> str:
    """A critical level p½, or "> max" ("< min" for bits) when retention never fell to one half."""
    if math.isinf(value):
        from lesionbench.kinds import axis_scale  # light: board_text stays importable without numpy

        return axis_scale(axis).beyond(max_level)
    return f"{value:.2g}" if abs(value) < 0.01 and value != 0 else f"{value:.2f}"


def has_interval(low: float | None, high: float | None) -> bool:
    """Whether both ends of an interval are numbers (not None, not NaN)."""
    return low is not None and high is not None and low == low and high == high


def with_interval(
    value: float | None, low: float | None = float("nan"), high: float | None = float("nan"), digits: int = 2
) -> str:
    """``0.87 [0.84, 0.90]``, or ``0.87`` without an interval."""
    if has_interval(low, high):
        return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"
    return fmt(value, digits)


def critical_text(value: float, low: float | None, high: float | None, max_level: float, axis: str) -> str:
    """A layer's p½ with its interval, as :func:`format_critical` writes each end (no interval
    when both ends are "never")."""
    text = format_critical(value, max_level, axis)
    if has_interval(low, high) and not (math.isinf(low) and math.isinf(high)):
        ends = [format_critical(v, max_level, axis).replace("> ", ">").replace("< ", "<") for v in (low, high)]
        text += f" [{ends[0]}, {ends[1]}]"
    return text


def grid_text(levels: Sequence[float]) -> str:
    """A level grid in a few characters: ``0, 0.1, …, 1 (11)`` for an even grid, else every level."""
    import numpy as np

    levels = sorted(float(v) for v in levels)
    if len(levels) > 4:
        steps = np.diff(levels)
        if np.allclose(steps, steps[0], rtol=1e-6, atol=1e-12):
            return f"{levels[0]:g}, {levels[1]:g}, …, {levels[-1]:g} ({len(levels)})"
    return ", ".join(f"{v:g}" for v in levels)


def table(rows: Sequence[Mapping[str, str]] | pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A Markdown (GitHub pipe) table of already formatted strings, by ``DataFrame.to_markdown``."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=columns)
    return frame.to_markdown(index=False, tablefmt="github", disable_numparse=True)


def not_scored() -> str:
    """What a model at chance shows instead of a score (:data:`lesionbench.scores.NOT_SCORED`)."""
    from lesionbench.scores import NOT_SCORED  # scores loads pandas: only when a board is rendered

    return NOT_SCORED
