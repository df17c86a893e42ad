"""From result files to the published artefacts: plots next to the results and the leaderboard.

This is the only place that writes the leaderboard; ``lesionbench leaderboard`` and the end of
``lesionbench run`` both come through here, so the two cannot drift apart. :func:`collect` draws
the figures and builds the leaderboard's data; :func:`write_documents` renders it with a reporter
(``md``, ``json``, ``html`` or a plugin's) and writes each document atomically.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from lesionbench.board import Leaderboard
from lesionbench.errors import LesionbenchError
from lesionbench.layer_score import DEFAULT_SCORE
from lesionbench.leaderboard import (
    MIN_CLASS_IMAGES,
    MODEL_PAGES,
    build_leaderboard,
    images_per_class,
    most_fragile_layers,
    ranked_perturbations,
    relative_link,
    reporter,
    track_bootstraps,
)
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
    df.loc[missing, "level_unit"] = [
        declared.get(p.removesuffix(BN_SUFFIX), "") for p in df.loc[missing, "perturbation"]
    ]
    return df


def publish(
    results: Sequence[Path | str],
    out_md: Path,
    plots_dir: Path | None = None,
    draw: bool = True,
    title: str = "lesionbench leaderboard",
    metric: str | None = None,
    format: str = "md",
    score: str = DEFAULT_SCORE,
) -> Path:
    """Write plots (into ``plots_dir``, default beside ``out_md``) and the leaderboard in ``format``
    (a reporter's name; default Markdown: ``out_md`` with ranked tables per track, each with its
    headline figure, and a page per model and track in ``models/`` beside it). Returns ``out_md``.

    Per-image outcomes beside the result files give every score its bootstrap interval (computed
    once, for the tables and the plots' bands; ``score``: the layer score's registered name, default
    ``area``). The documents are written last and atomically, so
    their presence says the figures are whole. Raises LesionbenchError for result files that break
    the schema or hold no rows, for an unknown format, and for a write that fails (a full disk: one
    line, nothing torn left as the leaderboard)."""
    render = reporter(format)  # an unknown format fails before any figure is drawn
    try:
        with _older_objects_not_collected():
            board = collect(results, Path(out_md).parent, plots_dir, draw, title, metric, score)
            return write_documents(render.render(board), Path(out_md), render.suffix)
    except OSError as exc:
        raise LesionbenchError(
            f"cannot write the leaderboard {str(out_md)!r} or its figures ({exc.strerror or exc})"
        ) from None


@contextmanager
def _older_objects_not_collected():
    """The objects alive before publishing (after a run: torch, the model and the data, hundreds of
    thousands) are left out of the garbage collector's full passes while the figures make their
    cycles (:func:`gc.freeze`): about 0.3 CPU s a demo-sized run. Nothing is done when the program
    froze objects itself, whose freeze :func:`gc.unfreeze` would undo."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def write_documents(documents: dict[str, str], out: Path, suffix: str) -> Path:
    """Write a reporter's documents: the main one (key ``""``) to ``out``, the others beside it, each
    atomically (a temporary file renamed); model pages of ``suffix`` left from models no longer in
    the results are removed. Returns ``out``."""
    from lesionbench.reporters import MAIN

    pages = dict(documents)
    pages[out.name] = pages.pop(MAIN)
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = set((out.parent / MODEL_PAGES).glob(f"*--*{suffix}")) - {out.parent / name for name in pages}
    for name, text in pages.items():
        path = out.parent / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    for path in stale:  # pages of models no longer in these results
        path.unlink()
    return out


def collect(
    results: Sequence[Path | str],
    out_dir: Path,
    plots_dir: Path | None = None,
    draw: bool = True,
    title: str = "lesionbench leaderboard",
    metric: str | None = None,
    score: str = DEFAULT_SCORE,
) -> Leaderboard:
    """The leaderboard's data for result files (or run directories), with the figures drawn into
    ``plots_dir`` (default ``out_dir/plots``; only their paths when not ``draw``) and every path
    relative to ``out_dir``, where the leaderboard's main document goes."""
    files = resolve_results(results)
    df, outcomes = read_results_with_outcomes(files, allow_empty=False)  # each file read once
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
    boots = track_bootstraps(df, outcomes, metrics, score=score)
    per_class, names = _per_class(df, outcomes, boots, metrics)
    out_dir = Path(out_dir)
    plots_dir = Path(plots_dir) if plots_dir is not None else out_dir / "plots"
    links = {}
    if draw:
        from lesionbench.plots import write_all

        bands = pd.concat([b.curves for b in boots.values()], ignore_index=True) if boots else None
        drawn = write_all(df, metrics, plots_dir, bands=bands, score=score)
    else:
        from lesionbench.plot_paths import planned_paths

        drawn = planned_paths(df, plots_dir)
    for dataset, pc in per_class.items():
        if images_per_class(pc)[0] < MIN_CLASS_IMAGES:
            continue  # too few images per class to read (the leaderboard says so)
        fragile = most_fragile_layers(boots[dataset].layers)
        if draw:
            from lesionbench.class_plots import class_retention_heatmaps

            cells = df[(df["dataset"] == dataset) & (df["perturbation"] != CLEAN)]
            units = cells.groupby("perturbation")["level_unit"].first().to_dict()
            paths = class_retention_heatmaps(pc, plots_dir, names.get(dataset), fragile, units)
        else:
            from lesionbench.plot_paths import planned_class_paths

            paths = planned_class_paths(pc, plots_dir)
        for model, path in zip(sorted(pc["model"].unique()), paths):
            drawn.setdefault(model, []).append(("per-class retention", path))
    for model, items in drawn.items():
        links[model] = [(label, relative_link(path, out_dir)) for label, path in items]
    headlines = {
        dataset: relative_link(path, out_dir)
        for dataset, path in _headline_figures(df, metrics, boots, plots_dir, draw, score).items()
    }
    sources = [relative_link(f, out_dir) for f in files]
    return build_leaderboard(
        df.drop(columns="outcome"),
        metrics,
        links,
        title=title,
        sources=sources,
        titles=titles,
        boots=boots,
        per_class=per_class,
        class_names=names,
        headlines=headlines,
        score=score,
    )


def _headline_figures(
    df: pd.DataFrame, metrics: dict, boots: dict, plots_dir: Path, draw: bool, score: str = DEFAULT_SCORE
) -> dict[str, Path]:
    """dataset → its headline figure, layer score against relative depth of every model of the track
    under (at most four of) the ranked perturbations; drawn when ``draw``, else only its path.

    Where the table holds one track, a score-vs-depth page of every model (drawn before, by
    :func:`lesionbench.plots.write_all`) with the same perturbations is the same figure: it is copied
    rather than drawn again (a run's own board: one figure fewer)."""
    from lesionbench.plot_paths import figure_layout, headline_path

    drawn_pages = {}  # perturbations → the score-vs-depth page of the whole table showing them
    if draw and df["dataset"].nunique() == 1:
        drawn_pages = {tuple(perts): page for _label, page, _kind, perts in figure_layout(df, plots_dir).get(None, [])}
    out = {}
    for dataset, dg in df[df["perturbation"] != CLEAN].groupby("dataset", sort=True):
        path = headline_path(plots_dir, dataset)
        if draw:
            from lesionbench.plots import score_vs_depth
            from lesionbench.scores import layer_scores

            track = df[df["dataset"] == dataset]
            scores = (
                boots[dataset].layers if dataset in boots else layer_scores(track, metrics.get(dataset, "top1"), score)
            )
            shared = (ranked_perturbations(track, scores)[0] or sorted(dg["perturbation"].unique()))[:4]
            page = drawn_pages.get(tuple(shared))
            if page is not None and page.is_file():
                shutil.copyfile(page, path)  # the same rows, metrics, score and panels
            else:
                score_vs_depth(track, metrics, path, shared, score)
        out[dataset] = path
    return out


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
