"""Figures a reader can trust: one colour per model in every panel, nothing wider than a page,
heatmap rows shared across panels, units on the axes, the clean point and chance visible."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from lesionbench.plots import (
    MAX_COLOURED_LAYERS,
    accuracy_curves_figure,
    retention_heatmap_figure,
    score_vs_depth_figure,
    write_all,
)
from lesionbench.scores import curves, layer_scores
from test_leaderboard import results


def _table(*parts: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True)


def _lines(ax):
    """The data lines of an axes (not the 0.5 or chance reference lines)."""
    return [l for l in ax.get_lines() if len(l.get_xdata()) > 1 and not str(l.get_label()).startswith("_")]


def test_each_model_has_one_colour_in_every_panel_and_the_legend_names_every_model():
    """Two runs sharing only some perturbations (a: p, q; b: q, r) and a third model on another
    dataset: the model a line belongs to is found from its numbers, and its colour must be the one
    the legend gives that model — in every panel, including those where it is the only line."""
    df = _table(
        results("a", perts=("p", "q"), layers={"l1": [0.9, 0.1, 0.1], "l2": [0.9, 0.9, 0.9]}),
        results("b", perts=("q", "r"), layers={"l1": [0.9, 0.9, 0.5], "l2": [0.9, 0.5, 0.1], "l3": [0.9, 0.9, 0.9]}),
        results("c", dataset="other", perts=("r",), layers={"k1": [0.9, 0.3, 0.2], "k2": [0.9, 0.8, 0.7]}),
    )
    expected = {}
    for _dataset, g in df.groupby("dataset"):
        s = layer_scores(g, "top1")
        for (model, pert), sg in s.groupby(["model", "perturbation"]):
            expected[(model, pert)] = list(sg.sort_values("relative_depth")["score"])
    fig = score_vs_depth_figure(df, {})
    (legend,) = fig.legends
    legend_colour = {
        t.get_text().split(":")[0]: to_rgba(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)
    }
    assert set(legend_colour) == {"a", "b", "c"}
    assert len(set(legend_colour.values())) == 3
    seen = set()
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        pert = ax.get_title()
        for line in _lines(ax):
            ys = list(line.get_ydata())
            owners = [
                m for (m, p), want in expected.items() if p == pert and len(want) == len(ys) and np.allclose(ys, want)
            ]
            assert len(owners) == 1, (pert, list(line.get_ydata()))
            assert to_rgba(line.get_color()) == legend_colour[owners[0]], (pert, owners[0])
            seen.add((owners[0], pert))
    assert seen == set(expected)  # every model × perturbation drawn, in its panel


def test_no_figure_is_wider_than_a_page_and_heatmaps_split_into_pages(tmp_path):
    """Nine perturbations and 40 layers: every PNG at most ~1,200 px wide, grids of at most four
    columns, and a heatmap too tall for one page is split over several files, all linked."""
    layers = {f"layer{i}": [0.9, 0.9 - 0.02 * i, 0.1] for i in range(40)}
    df = results("deep", layers=layers, perts=tuple(f"p{i}" for i in range(9)))
    links = write_all(df, {}, tmp_path)
    paths = [path for _label, path in links["deep"]]
    assert all(p.is_file() for p in paths)
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in paths}
    widths = {p.name: Image.open(p).size[0] for p in paths}
    assert max(widths.values()) <= 1210, widths
    heatmaps = [p for p in paths if "heatmap" in p.name]
    assert len(heatmaps) > 1  # 9 panels of 40 rows do not fit one page
    fig = retention_heatmap_figure(df, "deep", "top1", ["p0", "p1", "p2", "p3", "p4"])
    columns = {round(ax.get_position().x0, 3) for ax in fig.axes if ax.images}
    assert len(columns) <= 4


def test_heatmap_panels_share_their_rows():
    """A perturbation studied on fewer layers still puts each layer at the same height: its
    missing layer is an empty (masked) row, not a shift of the rows below."""
    full = results("m", perts=("p",), layers={"a": [0.9, 0.1, 0.1], "b": [0.9, 0.5, 0.5], "c": [0.9, 0.9, 0.9]})
    part = results("m", perts=("q",), layers={"a": [0.9, 0.1, 0.1], "b": [0.9, 0.5, 0.5], "c": [0.9, 0.9, 0.9]})
    part = part[part["layer"] != "b"]
    fig = retention_heatmap_figure(_table(full, part), "m", "top1", ["p", "q"])
    images = {ax.get_title(): ax.images[0].get_array() for ax in fig.axes if ax.images}
    assert images["p"].shape == images["q"].shape == (3, 3)
    assert not images["p"].mask.any()
    assert images["q"].mask[1].all() and not images["q"].mask[[0, 2]].any()
    assert np.allclose(images["q"][2], images["p"][2])  # layer c at the same height in both


def _with_axis(df: pd.DataFrame, levels: tuple, axis: str, unit: str) -> pd.DataFrame:
    df = df.copy()
    cells = df["perturbation"] != "clean"
    df.loc[cells, "level"] = df.loc[cells, "level"].map(dict(zip((0.0, 0.5, 1.0), levels)))
    df.loc[cells, "level_axis"], df.loc[cells, "level_unit"] = axis, unit
    return df


def test_log_axis_keeps_the_clean_point_names_its_unit_and_chance_stands_clear():
    """Bit error rates on a log axis: the clean accuracy is drawn at the left edge (tick "0"),
    the x axis says the unit, the ImageNet chance line (0.001) sits above the axis, and the
    title names dataset, image count and draws."""
    df = _with_axis(
        results("m", dataset="imagenet_val", classes=1000, perts=("flip",)),
        (0.0, 1e-5, 1e-3),
        "log",
        "bit error rate p",
    )
    fig = accuracy_curves_figure(df, "m", "flip", "top1")
    ax = fig.axes[0]
    for line in _lines(ax):
        x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        assert len(x) == 3 and x.min() < 1e-5 and y[np.argmin(x)] == pytest.approx(0.9)
    assert "0" in [t.get_text() for t in ax.get_xticklabels()]
    assert ax.get_xlabel() == "bit error rate p"
    chance = [l for l in ax.get_lines() if list(l.get_ydata()) == [0.001, 0.001]]
    assert chance and ax.get_ylim()[0] < -0.01  # a clear gap between the axis and the chance line
    title = fig._suptitle.get_text()
    assert "imagenet_val" in title and "100 images" in title and "2 draws per level" in title


def test_unit_falls_back_for_old_result_files_and_bits_run_from_many_to_few():
    df = _with_axis(results("m", perts=("quantize",)), (8.0, 4.0, 2.0), "descending", "")
    ax = accuracy_curves_figure(df, "m", "quantize", "top1").axes[0]
    assert ax.get_xlabel() == "level p"
    left, right = ax.get_xlim()
    assert left > right  # 8 bits on the left: damage grows to the right


def test_deep_networks_colour_only_the_layers_a_reader_looks_for():
    """Up to MAX_COLOURED_LAYERS layers each get a colour of their own; beyond that every layer is
    grey and the first, last, most fragile and most robust are coloured and named."""
    few = {f"l{i}": [0.9, 0.9 - 0.05 * i, 0.2] for i in range(MAX_COLOURED_LAYERS)}
    fig = accuracy_curves_figure(results("m", layers=few), "m", "p", "top1")
    colours = [to_rgba(l.get_color()) for l in _lines(fig.axes[0])]
    assert len(colours) == MAX_COLOURED_LAYERS and len(set(colours)) == MAX_COLOURED_LAYERS

    many = {f"l{i}": [0.9, 0.85 - 0.01 * i, 0.5 if i == 7 else 0.3] for i in range(30)}
    many["l7"] = [0.9, 0.9, 0.9]  # the most robust
    many["l12"] = [0.9, 0.1, 0.1]  # the most fragile
    fig = accuracy_curves_figure(results("m", layers=many), "m", "p", "top1")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    named = {label.split(" ")[0]: label for label in labels if label.startswith("l")}
    assert set(named) == {"l0", "l29", "l7", "l12"}
    assert "most fragile" in named["l12"] and "most robust" in named["l7"] and "first" in named["l0"]
    grey = [l for l in fig.axes[0].get_lines() if to_rgba(l.get_color()) == to_rgba("0.75")]
    assert len(grey) == 30


def test_band_is_the_bootstrap_where_given_and_the_title_says_which():
    df = results("m", layers={"conv1": [0.9, 0.6, 0.3]})
    title = accuracy_curves_figure(df, "m", "p", "top1")._suptitle.get_text()
    assert "95% t-interval of the mean over 2 draws" in title
    c = curves(df, "top1")
    bands = c.assign(band_low=0.25, band_high=0.35)
    fig = accuracy_curves_figure(df, "m", "p", "top1", bands=bands)
    assert "bootstrap over images and draws" in fig._suptitle.get_text()
    (band,) = fig.axes[0].collections
    ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    assert ys.min() == pytest.approx(0.25) and ys.max() == pytest.approx(0.35)
