"""Per-class retention heatmaps (matplotlib, PNG): rendering only, from a per-class table.

:func:`class_retention_figure` draws, for one model, a panel per perturbation: classes × levels
at that perturbation's most fragile layer (:func:`lesionbench.class_damage.fragile_layers`),
retention as colour on the same 0–1 scale as the layer heatmaps. It takes the table
:func:`lesionbench.per_class_accuracy` returns (see :mod:`lesionbench.class_damage`), so it does
not depend on how per-image outcomes are stored.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lesionbench.class_damage import class_label, fragile_layers, retention_grid  # noqa: E402
from lesionbench.plot_paths import class_path  # noqa: E402
from lesionbench.plot_paths import planned_class_paths as planned_class_paths  # noqa: E402

MAX_COLUMNS = 4


def class_retention_figure(
    per_class: pd.DataFrame,
    model: str,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    fragile: pd.DataFrame | None = None,
    units: Mapping[str, str] | None = None,
) -> Figure:
    """One panel per perturbation of ``model``: retention per class (rows) and level (columns) at
    its most fragile layer (``fragile``: columns model, perturbation, layer, to choose others).
    ``units`` (perturbation → what its level is, e.g. "fraction p of weights zeroed") label the x axes."""
    fragile = fragile_layers(per_class) if fragile is None else fragile
    rows = fragile[fragile["model"] == model].sort_values("perturbation")
    n = max(1, len(rows))
    cols = min(MAX_COLUMNS, n)
    nrows = math.ceil(n / cols)
    width = 2.4 * cols + 1.2
    fig, axes = plt.subplots(nrows, cols, figsize=(width, 0.32 * 10 * nrows + 1.6), layout="constrained", squeeze=False)
    image = None
    for ax, (_, row) in zip(axes.flat, rows.iterrows()):
        grid = retention_grid(per_class, model, row["perturbation"], row["layer"])
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(grid.shape[1]), [f"{x:g}" for x in grid.columns], rotation=90, fontsize=7)
        ax.set_yticks(range(grid.shape[0]), [class_label(c, class_names) for c in grid.index], fontsize=7)
        ax.set_title("\n".join(textwrap.wrap(f"{row['perturbation']} at {row['layer']}", 28)), fontsize=9)
        unit = (units or {}).get(row["perturbation"]) or "level"
        ax.set_xlabel("\n".join(textwrap.wrap(unit, 30)), fontsize=8)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="retention per class")
    title = f"{model}: per-class retention at each perturbation's most fragile layer"
    fig.suptitle("\n".join(textwrap.wrap(title, max(24, int(width * 11)))), fontsize=10)  # ~11 characters an inch
    return fig


def class_retention_heatmaps(
    per_class: pd.DataFrame,
    out_dir: Path,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    fragile: pd.DataFrame | None = None,
    units: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``<dataset>__<model>__classes.png`` for every model in ``per_class``; their paths.
    ``fragile`` (columns model, perturbation, layer) chooses each panel's layer (default: the
    lowest mean per-class retention, :func:`lesionbench.class_damage.fragile_layers`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fragile = fragile_layers(per_class) if fragile is None else fragile
    for (model, dataset), _g in per_class.groupby(["model", "dataset"], sort=True):
        fig = class_retention_figure(per_class, model, class_names, fragile, units)
        path = class_path(out_dir, dataset, model)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
