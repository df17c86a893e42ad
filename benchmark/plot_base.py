"""The shared pieces of lesionbench's figures (:mod:`lesionbench.plots`, :mod:`lesionbench.class_plots`):
sizes and style, file-safe names, colours and markers, panel grids, the damage-level axis (damage grows
to the right; a log axis keeps the clean point at its left edge past a break mark), titles, facts lines,
interval bands, saving.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lesionbench.kinds import axis_scale, format_level  # noqa: E402
from lesionbench.plot_paths import MAX_COLUMNS as MAX_COLUMNS  # noqa: E402
from lesionbench.plot_paths import MAX_PAGE_HEIGHT_IN as MAX_PAGE_HEIGHT_IN  # noqa: E402
from lesionbench.plot_paths import pages as pages  # noqa: E402
from lesionbench.plot_paths import safe_name as safe_name  # noqa: E402

DPI = 110
MAX_WIDTH_IN = 11.0  # × DPI ≈ 1,210 px: readable at a page width of 1,200 px
MAX_COLOURED_LAYERS = 10  # beyond this, grey context and a few highlighted layers
FALLBACK_UNIT = "level p"  # result files written before level_unit was recorded
STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


# ------------------------------------------------------------------------------ shared pieces


def palette(n: int) -> list:
    """``n`` qualitative colours, neighbours far apart (tab10, then tab20 for more)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def model_styles(keys: Sequence) -> dict:
    """key → (colour, marker), fixed for a figure: the same model looks the same in every panel."""
    colours = palette(len(keys))
    return {k: (colours[i], MARKERS[i % len(MARKERS)]) for i, k in enumerate(keys)}


def level_unit(df: pd.DataFrame, perturbation: str) -> str:
    """The x-axis label of a perturbation: its recorded unit, or "level p" for older files."""
    if "level_unit" in df.columns:
        units = df.loc[df["perturbation"] == perturbation, "level_unit"].dropna().astype(str)
        units = [u for u in units.unique() if u]
        if units:
            return units[0]
    return FALLBACK_UNIT


def panel_grid(n: int, panel_w: float, panel_h: float, extra_h: float = 0.9, **kw):
    cols = min(MAX_COLUMNS, max(1, n))
    rows = math.ceil(n / cols)
    width = min(MAX_WIDTH_IN, max(6.0, panel_w * cols + 0.9))  # at least wide enough for the title
    fig, axes = plt.subplots(
        rows, cols, figsize=(width, panel_h * rows + extra_h), layout="constrained", squeeze=False, **kw
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def damage_positions(levels: np.ndarray, axis: str) -> tuple[np.ndarray, float | None]:
    """x positions of levels on a plot, and (log axes) where the clean point 0 was placed."""
    return axis_scale(axis).plot_positions(levels)


fmt_level = format_level  # a level as a tick label (lesionbench.kinds.format_level)


def draw_level_axis(ax, axis: str, clean_x: float | None, levels: Sequence[float]) -> None:
    """Scale and direction of an x axis; on a log axis the clean point gets a tick "0" and a break."""
    axis_scale(axis).style_plot_axis(ax, clean_x, levels)


def suptitle(fig: Figure, *lines: str) -> None:
    """A figure title wrapped to the figure's width (about 13 characters an inch at 10 pt)."""
    width = int(fig.get_figwidth() * 13)
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize=10)


def chance_line(ax, chance: float) -> None:
    ax.axhline(chance, color="0.35", ls="--", lw=1, zorder=1)
    ax.set_ylim(-0.05, 1.03)  # below 0 so a chance line at 0.001 (ImageNet) stands clear of the axis


def plot_facts(df: pd.DataFrame, model: str, perts: Sequence[str] | None = None) -> dict:
    """Dataset, number of images and most draws per level behind a model's rows (under ``perts``), for titles."""
    rows = df[df["model"] == model]
    clean = rows[rows["perturbation"] == "clean"]
    images = clean["n_images"].dropna()
    cells = rows[rows["perturbation"] != "clean"]
    if perts is not None:
        cells = cells[cells["perturbation"].isin(perts)]
    damaged = cells[cells["level"] != 0] if (cells["level"] != 0).any() else cells  # level 0 is the clean row
    per_level = damaged.groupby(["layer", "perturbation", "level"])["draw"].nunique()
    return dict(
        dataset=str(rows["dataset"].iloc[0]) if len(rows) else "?",
        images=int(images.iloc[0]) if len(images) else None,
        draws=(int(per_level.min()), int(per_level.max())) if len(per_level) else (0, 0),
    )


def facts_line(facts: dict, draws: int | None = None) -> str:
    """ "fashion_mnist, 500 images, 5 draws per level" (a range of draws where perturbations differ)."""
    lo, hi = facts["draws"] if draws is None else (draws, draws)
    images = f"{facts['images']:,} images" if facts["images"] else "images unknown"
    count = f"{hi} draw{'s' if hi != 1 else ''}" if lo == hi else f"{lo}–{hi} draws"
    return f"{facts['dataset']}, {images}, {count} per level"


# ------------------------------------------------------------------------------ Figure 1


def with_band(c: pd.DataFrame, bands: pd.DataFrame | None) -> pd.DataFrame:
    """Curves with ``band_low``/``band_high`` and ``bootstrapped``: the bootstrap band where
    ``bands`` (rows keyed by model, dataset, layer, perturbation, level) has one, else the
    t-interval over draws (``ci_low``/``ci_high``)."""
    keys = ["model", "dataset", "layer", "perturbation", "level"]
    if bands is not None and len(c):
        c = c.merge(bands[keys + ["band_low", "band_high"]], on=keys, how="left")
    else:
        c = c.assign(band_low=float("nan"), band_high=float("nan"))
    missing = c["band_low"].isna() | c["band_high"].isna()
    c["bootstrapped"] = ~missing
    c.loc[missing, "band_low"], c.loc[missing, "band_high"] = c.loc[missing, "ci_low"], c.loc[missing, "ci_high"]
    return c


def band_caption(c: pd.DataFrame, draws: int) -> str:
    if c["bootstrapped"].all() and len(c):
        return "shaded: 95% interval, bootstrap over images and draws"
    if c["bootstrapped"].any():
        return "shaded: 95% interval (bootstrap over images and draws; t over draws where no outcomes were kept)"
    return f"shaded: 95% t-interval of the mean over {draws} draws" if draws > 1 else "no band"


def save_figure(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
