"""From result files to the published artefacts: plots next to the results and the leaderboard.

This is the only place that writes the leaderboard; ``lesionbench leaderboard`` and the end of
``lesionbench run`` both come through here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lesionbench.errors import LesionbenchError
from lesionbench.leaderboard import (MIN_CLASS_IMAGES, images_per_class, most_fragile_layers, relative_link, render,
                                     track_bootstraps)  # fmt: skip
from lesionbench.store import CLEAN, RESULTS, read_results_with_outcomes


def resolve_results(paths: Sequence[Path | str]) -> list[Path]:
    """Result files from files or run directories (searched recursively for results.csv)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob(RESULTS))
            if not found:
                raise LesionbenchError(f"no {RESULTS} under {str(p)!r}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise LesionbenchError(f"results path {str(p)!r} does not exist")
    return out


def declared_units(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of result files written before ``level_unit`` was recorded get the unit their
    perturbation declares now (its ``LevelAxis.label``), so plot axes name it; unknown ones keep ""."""
    from lesionbench.plan import BN_SUFFIX
    from lesionbench.registry import get_registry

    missing = (df["level_unit"].fillna("") == "") & (df["perturbation"] != CLEAN)
    if not missing.any():
        return df
    declared = {name: c.obj.axis.label for name, c in get_registry().contributions("perturbations").items()}
    df = df.copy()
    df.loc[missing, "level_unit"] = [declared.get(p.removesuffix(BN_SUFFIX), "") for p in df.loc[missing, "perturbation"]]
    return df


def publish(
    results: Sequence[Path | str],
    out_md: Path,
    plots_dir: Path | None = None,
    draw: bool = True,
    title: str = "lesionbench leaderboard",
    metric: str | None = None,
) -> Path:
    """Write plots (into ``plots_dir``, default beside ``out_md``) and the Markdown leaderboard.

    Per-image outcomes beside the result files give every score its bootstrap interval (computed
    once, for the tables and the plots' bands)."""
    files = resolve_results(results)
    df, outcomes = read_results_with_outcomes(files)  # each file read once
    df = declared_units(df)
    metrics, titles = {}, {}
    for f in files:
        manifest = _manifest(f)
        study = manifest.get("study", {}) if isinstance(manifest.get("study"), dict) else {}
        dataset = (study.get("dataset") or {}).get("name")
        if dataset is None:
            continue
        metrics.setdefault(dataset, metric or study.get("metric", "top1"))
        if (study.get("dataset") or {}).get("title"):
            titles.setdefault(dataset, study["dataset"]["title"])
    for dataset in df["dataset"].unique():
        metrics.setdefault(dataset, metric or "top1")
    boots = track_bootstraps(df, outcomes, metrics)
    per_class, names = _per_class(df, outcomes, boots, metrics)
    out_md = Path(out_md)
    plots_dir = Path(plots_dir) if plots_dir is not None else out_md.parent / "plots"
    links = {}
    if draw:
        from lesionbench.plots import write_all

        bands = pd.concat([b.curves for b in boots.values()], ignore_index=True) if boots else None
        drawn = write_all(df, metrics, plots_dir, bands=bands)
    else:
        from lesionbench.plots import planned_paths

        drawn = planned_paths(df, plots_dir)
    for dataset, pc in per_class.items():
        if images_per_class(pc)[0] < MIN_CLASS_IMAGES:
            continue  # too few images per class to read (the leaderboard says so)
        fragile = most_fragile_layers(boots[dataset].layers)
        if draw:
            from lesionbench.class_plots import class_retention_heatmaps

            paths = class_retention_heatmaps(pc, plots_dir, names.get(dataset), fragile)
        else:
            from lesionbench.class_plots import planned_class_paths

            paths = planned_class_paths(pc, plots_dir)
        for model, path in zip(sorted(pc["model"].unique()), paths):
            drawn.setdefault(model, []).append(("per-class retention", path))
    for model, items in drawn.items():
        links[model] = [(label, relative_link(path, out_md.parent)) for label, path in items]
    sources = [relative_link(f, out_md.parent) for f in files]
    text = render(df.drop(columns="outcome"), metrics, links, title=title, sources=sources, titles=titles, boots=boots,
                  per_class=per_class, class_names=names)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_md.with_name(out_md.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out_md)
    return out_md


def _per_class(df: pd.DataFrame, outcomes, boots: dict, metrics: dict) -> tuple[dict, dict]:
    """dataset → per-class accuracy table and dataset → class names, for tracks with outcomes."""
    from lesionbench.registry import get_registry
    from lesionbench.scores import per_class_accuracy

    sources = {name: c.obj for name, c in get_registry().contributions("datasets").items()}
    tables, names = {}, {}
    for dataset in boots:
        dg = df[df["dataset"] == dataset]
        if (dg["num_classes"] == 1).all():  # one class (text: next-token windows): nothing to tell apart
            continue
        tables[dataset] = per_class_accuracy(dg, outcomes, metrics.get(dataset, "top1"))
        name_of = getattr(sources.get(dataset), "class_names_for", None)  # optional; see DatasetSource
        if name_of is not None and dg["num_classes"].notna().any():
            found = name_of(int(dg["num_classes"].dropna().iloc[0]))
            if found is not None:
                names[dataset] = list(found)
    return tables, names


def _manifest(results_file: Path) -> dict:
    """The manifest beside a results file ({} when there is none or it is unreadable)."""
    path = Path(results_file).parent / "manifest.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError):
        return {}
