"""Paper-style figures from a results table (matplotlib, PNG): rendering only.

- :func:`accuracy_curves`: Cheney et al.'s Figure 1 — accuracy against level, a line per layer,
  a shaded 95% interval (the bootstrap band over images and draws where one is given, else the
  ``ci_low``–``ci_high`` t-interval over draws of :func:`lesionbench.scores.curves`), and chance.
  Up to :data:`MAX_COLOURED_LAYERS` layers each get their own colour and marker; deeper networks
  show every layer in grey and colour only the first, the last, the most fragile and the most
  robust layer, so 16–54 layers stay legible.
- :func:`retention_heatmap`: layers (by depth) × levels, retention as colour; one panel per
  perturbation, every panel with the same rows, at most four panels a row.
- :func:`score_vs_depth`: layer score against relative depth, a panel per perturbation, one
  colour and marker per model in every panel, and one legend naming every model.

Every figure is at most ``MAX_WIDTH_IN × DPI`` (about 1,200) pixels wide: perturbations are laid
out in grids of at most :data:`MAX_COLUMNS` columns, and a grid too tall for one page is split
over several files (:func:`planned_paths` names them). The x axis is labelled with each
perturbation's declared unit (``level_unit``, from its ``LevelAxis.label``; "level p" for result
files written before it was recorded); damage grows to the right on every axis (bit widths run
from many bits to few; error rates on a log axis keep the clean point at the left edge, past a
break mark).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from lesionbench.layer_score import DEFAULT_SCORE  # noqa: E402
from lesionbench.plot_base import (
    MARKERS,
    MAX_COLOURED_LAYERS,
    MAX_WIDTH_IN,  # noqa: E402,F401
    STYLE,
    band_caption,
    chance_line,
    damage_positions,
    draw_level_axis,
    facts_line,
    fmt_level,
    level_unit,
    model_styles,
    palette,
    panel_grid,
    plot_facts,
    safe_name,
    save_figure,
    suptitle,
    with_band,
)
from lesionbench.plot_paths import figure_layout, heatmap_row_height, heatmap_rows, planned_paths  # noqa: E402
from lesionbench.plot_paths import heatmap_groups as heatmap_groups  # noqa: E402
from lesionbench.plot_paths import pages as pages  # noqa: E402
from lesionbench.scores import curves, layer_scores, to_axis  # noqa: E402


def accuracy_curves_figure(
    df: pd.DataFrame,
    model: str,
    perturbation: str,
    metric: str,
    c: pd.DataFrame | None = None,
    bands: pd.DataFrame | None = None,
    score: str = DEFAULT_SCORE,
) -> Figure:
    """Accuracy against level for every layer of ``model`` under ``perturbation`` (not saved);
    ``bands``: bootstrap bands (see :func:`with_band`); ``score``: the layer score's registered name."""
    if c is None:
        c = curves(df[df["model"] == model], metric)
    c = with_band(c[c["perturbation"] == perturbation], bands)
    axis = c["level_axis"].iloc[0] if len(c) else "linear"
    facts = plot_facts(df, model)
    draws = int(c["n"].max()) if len(c) else 0
    layers = c.drop_duplicates("layer").sort_values("layer_index")
    scored = layer_scores(df[(df["model"] == model) & df["perturbation"].isin(["clean", perturbation])], metric, score)
    score = dict(zip(scored["layer"], scored["score"]))
    x_all, clean_x = damage_positions(c["level"], axis)
    c = c.assign(x=x_all)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9.0, 4.8), layout="constrained")
        names = list(layers["layer"])
        if len(names) <= MAX_COLOURED_LAYERS:
            highlighted = {name: name for name in names}
        else:  # grey context for every layer, colour for the few a reader looks for
            for name in names:
                g = c[c["layer"] == name].sort_values("x")
                ax.plot(g["x"], g["mean"], color="0.75", lw=0.8, zorder=2)
            highlighted = _highlights(names, score)
        colours = palette(len(highlighted))
        for i, (name, label) in enumerate(highlighted.items()):
            g = c[c["layer"] == name].sort_values("x")
            colour = colours[i]
            ax.plot(
                g["x"], g["mean"], marker=MARKERS[i % len(MARKERS)], ms=4, lw=1.6, color=colour, zorder=3, label=label
            )
            if draws > 1 or g["bootstrapped"].any():
                ax.fill_between(
                    g["x"],
                    g["band_low"].clip(0, 1),
                    g["band_high"].clip(0, 1),
                    color=colour,
                    alpha=0.12,
                    lw=0,
                    zorder=2,
                )
        chance = float(c["chance"].iloc[0]) if len(c) else 0.0
        chance_line(ax, chance)
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="0.35", ls="--", lw=1))
        labels.append(f"chance ({chance:g})")
        if len(names) > MAX_COLOURED_LAYERS:
            handles.append(Line2D([], [], color="0.75", lw=0.8))
            labels.append(f"the other {len(names) - len(highlighted)} layers")
        fig.legend(handles, labels, loc="outside right center", title=f"layer ({len(names)} studied)")
        draw_level_axis(ax, axis, clean_x, c["level"].unique())
        ax.set_xlabel(level_unit(df, perturbation))
        ax.set_ylabel(f"{metric} accuracy")
        band = band_caption(c, draws)
        suptitle(fig, f"{model} under {perturbation}", f"{facts_line(facts, draws)}; {band}")
    return fig


def _highlights(names: list[str], score: Mapping[str, float]) -> dict[str, str]:
    """layer → legend label for the first, last, most fragile and most robust layers."""
    picks: dict[str, list[str]] = {}
    roles = [(names[0], "first"), (names[-1], "last")]
    if score:
        known = [n for n in names if n in score]
        if known:
            roles.append((min(known, key=lambda n: score[n]), "most fragile"))
            roles.append((max(known, key=lambda n: score[n]), "most robust"))
    for name, role in roles:
        picks.setdefault(name, []).append(role)
    ordered = [n for n in names if n in picks]
    return {n: f"{n} ({', '.join(picks[n])}" + (f"; score {score[n]:.2f})" if n in score else ")") for n in ordered}


def accuracy_curves(
    df: pd.DataFrame,
    model: str,
    perturbation: str,
    metric: str,
    out: Path,
    c: pd.DataFrame | None = None,
    bands: pd.DataFrame | None = None,
    score: str = DEFAULT_SCORE,
) -> Path:
    """Figure 1 for one model and perturbation, written to ``out`` (PNG)."""
    return save_figure(accuracy_curves_figure(df, model, perturbation, metric, c, bands, score), out)


# ------------------------------------------------------------------------------ heatmap


def retention_heatmap_figure(
    df: pd.DataFrame, model: str, metric: str, perts: Sequence[str] | None = None, c: pd.DataFrame | None = None
) -> Figure:
    """Retention by layer (rows, the same in every panel) and level (columns, damage growing to
    the right), one panel per perturbation (not saved)."""
    mine = df[df["model"] == model]
    if c is None:
        c = curves(mine, metric)
    perts = list(perts if perts is not None else sorted(c["perturbation"].unique()))
    rows = heatmap_rows(mine[mine["perturbation"].isin(perts)])
    index = pd.MultiIndex.from_tuples(rows, names=["layer_index", "layer"])
    facts = plot_facts(df, model, perts)
    cmap = plt.get_cmap("magma").with_extremes(bad="0.88")
    with plt.rc_context(STYLE):
        fig, axes = panel_grid(len(perts), 2.5, heatmap_row_height(len(rows)), extra_h=0.8, sharey=True)
        image = None
        for ax, p in zip(axes.flat, perts):
            g = c[c["perturbation"] == p]
            axis = g["level_axis"].iloc[0] if len(g) else "linear"
            grid = g.pivot_table(index=["layer_index", "layer"], columns="level", values="retention").reindex(index)
            order = np.argsort(to_axis(grid.columns.to_numpy(), axis), kind="stable")  # damage grows rightwards
            grid = grid.iloc[:, order]
            image = ax.imshow(
                np.ma.masked_invalid(grid.to_numpy(dtype=float)),
                aspect="auto",
                cmap=cmap,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ticks = list(range(0, len(grid.columns), max(1, math.ceil(len(grid.columns) / 5))))
            ax.set_xticks(ticks, [fmt_level(grid.columns[t]) for t in ticks])
            ax.set_xlabel(textwrap.fill(level_unit(mine, p), 30), fontsize=8)
            ax.set_title(p)
        for ax in axes[:, 0]:
            ax.set_yticks(range(len(rows)), [name for _, name in rows], fontsize=7 if len(rows) > 20 else 8)
            ax.set_ylabel("layer (input → output)")
        if image is not None:
            fig.colorbar(image, ax=axes.ravel().tolist(), label="retention r(p)", shrink=0.9, aspect=30)
        suptitle(
            fig,
            f"{model}: retention by layer and level ({metric}; 1 = clean, 0 = chance; grey = not studied)",
            facts_line(facts),
        )
    return fig


def retention_heatmap(
    df: pd.DataFrame,
    model: str,
    metric: str,
    out: Path,
    perts: Sequence[str] | None = None,
    c: pd.DataFrame | None = None,
) -> Path:
    """The heatmap of one model (``perts``: the perturbations on this page), written to ``out``."""
    return save_figure(retention_heatmap_figure(df, model, metric, perts, c), out)


# ------------------------------------------------------------------------------ score vs depth


def score_vs_depth_figure(
    df: pd.DataFrame, metrics: Mapping[str, str], perts: Sequence[str] | None = None, score: str = DEFAULT_SCORE
) -> Figure:
    """Layer score (``score``, a registered name) against relative depth, a panel per perturbation;
    each model keeps one colour and marker in every panel and the legend names every model of the
    table (not saved)."""
    frames = [layer_scores(g, metrics.get(d, "top1"), score) for d, g in df.groupby("dataset")]
    s = pd.concat(frames, ignore_index=True)
    keys = sorted(set(zip(s["model"], s["dataset"])))
    styles = model_styles(keys)
    perts = list(perts if perts is not None else sorted(s["perturbation"].unique()))
    facts = {key: plot_facts(df[df["dataset"] == key[1]], key[0]) for key in keys}
    with plt.rc_context(STYLE):
        fig, axes = panel_grid(len(perts), 2.55, 2.3, extra_h=0.9 + 0.22 * math.ceil(len(keys) / 2), sharey=True)
        for ax, p in zip(axes.flat, perts):
            for key, g in s[s["perturbation"] == p].groupby(["model", "dataset"], sort=True):
                colour, marker = styles[key]
                g = g.sort_values("relative_depth")
                ax.plot(
                    g["relative_depth"], g["score"], color=colour, marker=marker, ms=3.5, lw=1.3, label=_key_label(key)
                )
            ax.set_title(p)
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlim(-0.05, 1.05)
            ax.axhline(0.5, color="grey", ls=":", lw=1)
        for ax in axes[-1, :]:
            ax.set_xlabel("relative depth (0 = first layer)")
        for ax in axes[:, 0]:
            ax.set_ylabel("layer score")
        for col in range(axes.shape[1]):  # a column whose last panel is hidden gets its label one up
            visible = [ax for ax in axes[:, col] if ax.get_visible()]
            if visible:
                visible[-1].set_xlabel("relative depth (0 = first layer)")
        handles = [Line2D([], [], color=styles[k][0], marker=styles[k][1], lw=1.3, ms=4) for k in keys]
        labels = [f"{k[0]}: {facts_line(facts[k])}" for k in keys]
        fig.legend(handles, labels, loc="outside lower center", ncol=1 if len(keys) < 3 else 2, frameon=False)
        metric_text = ", ".join(sorted({metrics.get(d, "top1") for _, d in keys}))
        suptitle(
            fig,
            f"Layer-robustness score against depth (from {metric_text}; 1 = untouched, 0 = chance)",
            "dotted: 0.5, below which a layer is critical",
        )
    return fig


def _key_label(key: tuple[str, str]) -> str:
    return f"{key[0]} ({key[1]})"


def score_vs_depth(
    df: pd.DataFrame,
    metrics: Mapping[str, str],
    out: Path,
    perts: Sequence[str] | None = None,
    score: str = DEFAULT_SCORE,
) -> Path:
    """The score-vs-depth figure (``perts``: the perturbations on this page), written to ``out``."""
    return save_figure(score_vs_depth_figure(df, metrics, perts, score), out)


# ------------------------------------------------------------------------------ all figures


def write_all(
    df: pd.DataFrame,
    metrics: Mapping[str, str],
    out_dir: Path,
    bands: pd.DataFrame | None = None,
    score: str = DEFAULT_SCORE,
) -> dict[str, list[tuple[str, Path]]]:
    """Draw every figure for a results table; returns model → [(label, path)] for the leaderboard.

    ``metrics`` maps dataset → the metric scores come from (default top1); ``bands``: bootstrap
    bands for the accuracy curves (see :func:`with_band`); ``score``: the layer score's registered name."""
    layout = figure_layout(df, out_dir)
    for (model, dataset), _g in df[df["perturbation"] != "clean"].groupby(["model", "dataset"], sort=True):
        metric = metrics.get(dataset, "top1")
        track = df[df["dataset"] == dataset]
        c = curves(track[track["model"] == model], metric)  # once per model, for all its figures
        stem = f"{safe_name(dataset)}__{safe_name(model)}__"
        for _label, path, kind, perts in layout[model]:
            if not path.name.startswith(stem):  # the same model on another dataset
                continue
            if kind == "curves":
                accuracy_curves(track, model, perts[0], metric, path, c, bands, score)
            else:
                retention_heatmap(track, model, metric, path, perts, c)
    for _label, path, _kind, perts in layout.get(None, []):
        score_vs_depth(df, metrics, path, perts, score)
    return planned_paths(df, out_dir)
