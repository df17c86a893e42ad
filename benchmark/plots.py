"""Paper-style figures from a results table (matplotlib, PNG): rendering only.

- :func:`accuracy_curves`: Cheney et al.'s Figure 1 — accuracy vs level, a line per layer, a band
  for the 95% interval (from the bootstrap over images and draws when the run kept per-image
  outcomes, else the t-interval over draws), and the chance line;
- :func:`retention_heatmap`: layers (by depth) × levels, retention as colour;
- :func:`score_vs_depth`: layer score against relative depth, a line per model.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lesionbench.scores import curves, layer_scores  # noqa: E402


def safe_name(text: str) -> str:
    """A file-name-safe version of a model or plugin name: no separators, no traversal."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return cleaned or "unnamed"


MAX_LEGEND_LAYERS = 12  # beyond this a depth colour bar replaces the per-layer legend


def with_band(c: pd.DataFrame, bands: pd.DataFrame | None) -> pd.DataFrame:
    """Curves with ``band_low``/``band_high``: the bootstrap band where ``bands`` (the ``curves`` of
    :func:`lesionbench.scores.bootstrap`) has one, else the t-interval over draws."""
    keys = ["model", "dataset", "layer", "perturbation", "level"]
    if bands is not None and len(c):
        c = c.merge(bands[keys + ["band_low", "band_high"]], on=keys, how="left")
    else:
        c = c.assign(band_low=float("nan"), band_high=float("nan"))
    missing = c["band_low"].isna() | c["band_high"].isna()
    c.loc[missing, "band_low"], c.loc[missing, "band_high"] = c.loc[missing, "ci_low"], c.loc[missing, "ci_high"]
    return c


def accuracy_curves(df: pd.DataFrame, model: str, perturbation: str, metric: str, out: Path,
                    bands: pd.DataFrame | None = None) -> Path:  # fmt: skip
    c = curves(df[df["model"] == model], metric)
    c = with_band(c[c["perturbation"] == perturbation], bands)
    axis = c["level_axis"].iloc[0] if len(c) else "linear"
    if axis == "log":
        c = c[c["level"] > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    if axis == "log":
        ax.set_xscale("log")
    elif axis == "descending":
        ax.invert_xaxis()  # damage grows to the right, as on every other plot
    cmap = plt.get_cmap("viridis")
    layers = c.drop_duplicates("layer").sort_values("layer_index")
    many = len(layers) > MAX_LEGEND_LAYERS
    for _, layer in layers.iterrows():
        g = c[c["layer"] == layer["layer"]].sort_values("level")
        colour = cmap(float(layer["relative_depth"]))
        ax.plot(g["level"], g["mean"], marker="o", ms=2 if many else 3, lw=1 if many else 1.5, color=colour,
                label=None if many else layer["layer"])  # fmt: skip
        ax.fill_between(g["level"], g["band_low"].clip(0, 1), g["band_high"].clip(0, 1), color=colour,
                        alpha=0.04 if many else 0.15, lw=0)  # fmt: skip
    chance = c["chance"].iloc[0]
    ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel(f"{perturbation} level p")
    ax.set_ylabel(f"{metric} accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{model}: {perturbation}", fontsize=10)
    if many:
        bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1)), ax=ax)
        bar.set_label(f"layer depth (0 = first, 1 = last; {len(layers)} layers)")
        ax.legend(fontsize=7, loc="lower left")
    else:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out)


def retention_heatmap(df: pd.DataFrame, model: str, metric: str, out: Path) -> Path:
    c = curves(df[df["model"] == model], metric)
    perts = sorted(c["perturbation"].unique())
    n_layers = c["layer"].nunique()
    fig, axes = plt.subplots(
        1, len(perts), figsize=(3.6 * len(perts) + 1, 1.2 + 0.28 * n_layers), layout="constrained", squeeze=False
    )
    image = None
    for ax, p in zip(axes[0], perts):
        g = c[c["perturbation"] == p]
        grid = g.pivot_table(index=["layer_index", "layer"], columns="level", values="retention")
        image = ax.imshow(grid.values, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(grid.index)), [name for _, name in grid.index], fontsize=7)
        ticks = range(0, len(grid.columns), max(1, len(grid.columns) // 6))
        ax.set_xticks(list(ticks), [f"{grid.columns[t]:g}" for t in ticks], fontsize=7)
        ax.set_xlabel(f"{p} level")
        ax.set_title(p, fontsize=9)
    axes[0][0].set_ylabel("layer (input → output)")
    fig.colorbar(image, ax=axes[0].tolist(), label="retention r(p)", shrink=0.9)
    fig.suptitle(f"{model}: retention by layer and level ({metric})", fontsize=10)
    return _save(fig, out)


def score_vs_depth(df: pd.DataFrame, metrics: dict[str, str], out: Path) -> Path:
    frames = [layer_scores(g, metrics.get(d, "top1")) for d, g in df.groupby("dataset")]
    s = pd.concat(frames, ignore_index=True)
    perts = sorted(s["perturbation"].unique())
    fig, axes = plt.subplots(1, len(perts), figsize=(4.2 * len(perts), 3.8), layout="constrained", squeeze=False, sharey=True)
    for ax, p in zip(axes[0], perts):
        for (model, dataset), g in s[s["perturbation"] == p].groupby(["model", "dataset"], sort=True):
            g = g.sort_values("relative_depth")
            ax.plot(g["relative_depth"], g["score"], marker="o", ms=3, label=f"{model} ({dataset})")
        ax.set_title(p, fontsize=10)
        ax.set_xlabel("relative depth (0 = first layer, 1 = last)")
        ax.set_ylim(-0.02, 1.02)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
    axes[0][0].set_ylabel("layer-robustness score")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def planned_paths(df: pd.DataFrame, out_dir: Path) -> dict[str, list[tuple[str, Path]]]:
    """model → [(label, path)] of every figure :func:`write_all` draws for ``df``."""
    links: dict[str, list[tuple[str, Path]]] = {}
    cells = df[df["perturbation"] != "clean"]
    for (model, dataset), g in cells.groupby(["model", "dataset"], sort=True):
        stem = f"{safe_name(dataset)}__{safe_name(model)}"
        mine = links.setdefault(model, [])
        mine += [(p, out_dir / f"{stem}__{safe_name(p)}.png") for p in sorted(g["perturbation"].unique())]
        mine.append(("heatmap", out_dir / f"{stem}__heatmap.png"))
    for model in links:
        links[model].append(("score vs depth, all models", out_dir / "score_vs_depth.png"))
    return links


def write_all(df: pd.DataFrame, metrics: dict[str, str], out_dir: Path,
              bands: pd.DataFrame | None = None) -> dict[str, list[tuple[str, Path]]]:  # fmt: skip
    """Draw every figure for a results table; returns model → [(label, path)] for the leaderboard.
    ``bands``: bootstrap bands for the accuracy curves (see :func:`with_band`)."""
    links = planned_paths(df, out_dir)
    for (model, dataset), g in df[df["perturbation"] != "clean"].groupby(["model", "dataset"], sort=True):
        metric = metrics.get(dataset, "top1")
        track = df[df["dataset"] == dataset]
        stem = f"{safe_name(dataset)}__{safe_name(model)}"
        paths = {label: path for label, path in links[model] if path.name.startswith(stem)}
        for p in sorted(g["perturbation"].unique()):
            accuracy_curves(track, model, p, metric, paths[p], bands)
        retention_heatmap(track, model, metric, paths["heatmap"])
    if links:
        score_vs_depth(df, metrics, out_dir / "score_vs_depth.png")
    return links
