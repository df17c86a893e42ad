"""Which classes a lesion hurts: pure functions over a table of per-class accuracies.

The input is the long table that :func:`lesionbench.per_class_accuracy` returns (or any table with
the same columns): one row per model × layer × perturbation × level × class with ``model``,
``dataset``, ``layer``, ``layer_index``, ``perturbation``, ``level``, ``class`` (the label),
``n_images``, ``accuracy``, ``clean`` (the undamaged model's accuracy on the class) and
``retention`` (clip((accuracy − chance) / (clean − chance), 0, 1)). Nothing here knows how the
per-image outcomes behind it are stored.

Definitions (per model × perturbation):

* a layer's **fragility** is its mean retention over the levels studied, each level's retention
  being the image-weighted mean over classes (the lower, the more fragile); the **most fragile
  layer** has the lowest (ties: the earlier layer);
* a class's **damage** at that layer is its mean retention over the levels; the classes **hurt
  most** have the lowest (ties: the lower label). This is how lesion studies read class-specific
  effects (Meyes et al. 2019, *Ablation studies in artificial neural networks*; Hooker et al. 2019,
  *What do compressed deep neural networks forget?*).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

KEY = ["model", "dataset", "perturbation"]
NEEDED = KEY + ["layer", "layer_index", "level", "class", "n_images", "accuracy", "clean", "retention"]


def _check(per_class: pd.DataFrame) -> None:
    missing = [c for c in NEEDED if c not in per_class.columns]
    if missing:
        raise ValueError(f"a per-class table needs the columns {', '.join(missing)}")


def fragile_layers(per_class: pd.DataFrame) -> pd.DataFrame:
    """Per model × perturbation, the most fragile layer: columns model, dataset, perturbation,
    layer, layer_index, fragility (mean retention over levels; see the module docstring)."""
    _check(per_class)
    cols = KEY + ["layer", "layer_index", "fragility"]
    if per_class.empty:
        return pd.DataFrame(columns=cols)
    df = per_class.assign(weighted=per_class["retention"] * per_class["n_images"])
    level = (
        df.groupby(KEY + ["layer", "layer_index", "level"], sort=False)[["weighted", "n_images"]].sum().reset_index()
    )
    level["retention"] = level["weighted"] / level["n_images"]
    layer = (
        level.groupby(KEY + ["layer", "layer_index"], sort=False)["retention"].mean().rename("fragility").reset_index()
    )
    layer = layer.sort_values(KEY + ["fragility", "layer_index"], kind="stable")
    return layer.drop_duplicates(KEY).reset_index(drop=True)[cols]


def classes_hurt(per_class: pd.DataFrame, fragile: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every class's damage at each model × perturbation's most fragile layer, hurt most first.

    ``fragile`` (columns model, perturbation, layer) names the layer to read instead, e.g. the
    leaderboard's most fragile layer by layer score; by default :func:`fragile_layers`. Returns
    columns model, dataset, perturbation, layer, class, clean, accuracy (mean over levels),
    retention (mean over levels) and rank (1 = hurt most).
    """
    _check(per_class)
    fragile = fragile_layers(per_class) if fragile is None else fragile
    cols = KEY + ["layer", "class", "clean", "accuracy", "retention", "rank"]
    at = per_class.merge(fragile[["model", "perturbation", "layer"]], on=["model", "perturbation", "layer"])
    if at.empty:
        return pd.DataFrame(columns=cols)
    out = (
        at.groupby(KEY + ["layer", "class"], sort=False)
        .agg(clean=("clean", "first"), accuracy=("accuracy", "mean"), retention=("retention", "mean"))
        .reset_index()
    )
    out = out.sort_values(KEY + ["retention", "class"], kind="stable", ignore_index=True)
    out["rank"] = out.groupby(KEY, sort=False).cumcount() + 1
    return out[cols]


def class_label(label: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    """A class's name when known (a list indexed by label, or a mapping), else ``class <label>``."""
    label = int(label)
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, f"class {label}"))
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return f"class {label}"


def hurt_lines(
    hurt: pd.DataFrame, k: int = 2, class_names: Sequence[str] | Mapping[int, str] | None = None
) -> list[str]:
    """One Markdown line per model × perturbation naming the ``k`` classes hurt most and the one
    hurt least, with their mean retention, from :func:`classes_hurt`'s table."""
    lines = []
    for (model, _dataset, perturbation), g in hurt.groupby(KEY, sort=True):
        g = g.sort_values("rank")
        most = ", ".join(
            f"{class_label(r['class'], class_names)} ({r['retention']:.2f})" for _, r in g.head(k).iterrows()
        )
        least = g.iloc[-1]
        lines.append(
            f"- **{model}**, {perturbation} at {g['layer'].iloc[0]}: hurt most {most}; least "
            f"{class_label(least['class'], class_names)} ({least['retention']:.2f}) — mean retention over levels"
        )
    return lines


def retention_grid(per_class: pd.DataFrame, model: str, perturbation: str, layer: str) -> pd.DataFrame:
    """Classes (rows, by label) × levels (columns, ascending) of retention for one layer."""
    g = per_class[
        (per_class["model"] == model) & (per_class["perturbation"] == perturbation) & (per_class["layer"] == layer)
    ]
    grid = g.pivot_table(index="class", columns="level", values="retention", aggfunc="mean")
    return grid.sort_index().reindex(sorted(grid.columns), axis=1).astype(np.float64)
