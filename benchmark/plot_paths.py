"""Where lesionbench's figures go, and which figure shows what, without drawing anything.

The file names and page layout of every figure :mod:`lesionbench.plots` and
:mod:`lesionbench.class_plots` draw: a leaderboard published without figures links the very paths a
published-with-figures one writes, and imports no matplotlib (pandas only). The drawing modules
import these names from here and re-export them under their old paths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

MAX_PAGE_HEIGHT_IN = 13.0  # a taller grid is split over several files
MAX_COLUMNS = 4


def safe_name(text: str) -> str:
    """A file-name-safe version of a model or plugin name: no separators, no traversal."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return cleaned or "unnamed"


def pages(items: Sequence, row_height_in: float) -> list[list]:
    """``items`` in chunks, each a grid of at most MAX_COLUMNS columns no taller than a page."""
    rows_per_page = max(1, int(MAX_PAGE_HEIGHT_IN // max(row_height_in, 0.1)))
    per_page = rows_per_page * MAX_COLUMNS
    return [list(items[i : i + per_page]) for i in range(0, len(items), per_page)] or [[]]


def heatmap_rows(df: pd.DataFrame) -> list[tuple[int, str]]:
    """(layer_index, layer) of every layer any perturbation in ``df`` studied, input to output:
    the rows every panel of one heatmap shares."""
    cells = df[df["perturbation"] != "clean"]
    rows = cells[["layer_index", "layer"]].drop_duplicates()
    return [(int(i), str(n)) for i, n in sorted(zip(rows["layer_index"], rows["layer"]))]


def heatmap_groups(df: pd.DataFrame) -> list[list[str]]:
    """A model's perturbations grouped by the layers they were studied on (block_removal's stages,
    a run over every layer beside one over a few): each group is drawn with rows of its own."""
    cells = df[df["perturbation"] != "clean"]
    groups: dict[frozenset, list[str]] = {}
    for p, g in cells.groupby("perturbation", sort=True):
        groups.setdefault(frozenset(g["layer"]), []).append(p)
    return sorted(groups.values(), key=lambda perts: perts[0])


def heatmap_row_height(n_rows: int) -> float:
    """The height in inches of one row of heatmap panels with ``n_rows`` layers."""
    return 0.16 * n_rows + 0.75


def _paged(stem: str, chunks: list[list[str]], out_dir: Path, label: str) -> list[tuple[str, Path, list[str]]]:
    if len(chunks) == 1:
        return [(label, out_dir / f"{stem}.png", chunks[0])]
    return [(f"{label} {i}/{len(chunks)}", out_dir / f"{stem}_{i}.png", chunk) for i, chunk in enumerate(chunks, 1)]


def figure_layout(df: pd.DataFrame, out_dir: Path) -> dict:
    """Every figure :func:`lesionbench.plots.write_all` draws: model → [(label, path, kind,
    perturbations)] (kind "curves" or "heatmap"), and the score-vs-depth pages (kind "depth") under
    the key None."""
    out: dict = {}
    cells = df[df["perturbation"] != "clean"]
    for (model, dataset), g in cells.groupby(["model", "dataset"], sort=True):
        stem = f"{safe_name(dataset)}__{safe_name(model)}"
        perts = sorted(g["perturbation"].unique())
        mine = out.setdefault(model, [])
        mine += [(p, out_dir / f"{stem}__{safe_name(p)}.png", "curves", [p]) for p in perts]
        chunks = [
            chunk
            for group in heatmap_groups(g)
            for chunk in pages(group, heatmap_row_height(len(heatmap_rows(g[g["perturbation"].isin(group)]))))
        ]
        mine += [
            (label, path, "heatmap", chunk)
            for label, path, chunk in _paged(f"{stem}__heatmap", chunks, out_dir, "heatmap")
        ]
    if out:
        perts = sorted(cells["perturbation"].unique())
        out[None] = [
            (label, path, "depth", chunk)
            for label, path, chunk in _paged("score_vs_depth", pages(perts, 2.3), out_dir, "score vs depth, all models")
        ]
    return out


def planned_paths(df: pd.DataFrame, out_dir: Path) -> dict[str, list[tuple[str, Path]]]:
    """model → [(label, path)] of every figure :func:`lesionbench.plots.write_all` draws for ``df``."""
    layout = figure_layout(df, out_dir)
    shared = [(label, path) for label, path, _kind, _perts in layout.pop(None, [])]
    return {model: [(label, path) for label, path, _k, _p in items] + shared for model, items in layout.items()}


def headline_path(plots_dir: Path, dataset: str) -> Path:
    """Where the headline figure (score against depth, every model of a track) of ``dataset`` goes."""
    return Path(plots_dir) / f"{safe_name(dataset)}__headline.png"


def class_path(out_dir: Path, dataset: str, model: str) -> Path:
    """Where :func:`lesionbench.class_plots.class_retention_heatmaps` writes ``model``'s heatmap on ``dataset``."""
    return Path(out_dir) / f"{safe_name(dataset)}__{safe_name(model)}__classes.png"


def planned_class_paths(per_class: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The paths :func:`lesionbench.class_plots.class_retention_heatmaps` would write, in the same
    order, drawing nothing."""
    keys = per_class[["model", "dataset"]].drop_duplicates().sort_values(["model", "dataset"])
    return [class_path(out_dir, d, m) for m, d in keys.itertuples(index=False)]
