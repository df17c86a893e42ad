"""The leaderboard as data, rendered by reporters — never edited by hand.

:func:`build_leaderboard` turns a results table into a :class:`lesionbench.board.Leaderboard`: per
track (dataset) the models ranked by overall robustness (the mean over perturbations of the mean
layer score) over the perturbations every model of the track was studied under with the same level
grid, with 95% bootstrap intervals when there are per-image outcomes (models that cannot be told
apart share a rank, :func:`lesionbench.scores.bootstrap`), the level grids, where the fragile layers
are, the classes they hurt, and per model its layer tables and plots. All the bootstrapping and
ranking happens there. :func:`render` hands the data to a reporter — a plugin kind (hook
``lesionbench_reporters``); the built-ins are ``md`` (``LEADERBOARD.md`` and ``models/*.md``),
``json`` (schema ``lesionbench.leaderboard/1``) and ``html`` (one static page).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionbench.board import (
    BootstrapInfo,
    Cell,
    ClassDamage,
    ClassHurt,
    ClassScore,
    Depth,
    Entry,
    Fragile,
    Grid,
    LayerRow,
    LayerTable,
    Leaderboard,
    Link,
    ModelPage,
    Score,
    Track,
    Unscored,
    Weakest,
    num,
)
from lesionbench.board_stats import (
    depth_thirds,
    draws_range,
    evaluation_seconds,
    images_per_class,
    layer_groups,
    level_grids,
    mean_score,
    model_facts,
    most_fragile_layers,
    ranked_perturbations,
    ranking,
    track_bootstraps,
)
from lesionbench.board_text import format_critical, grid_text, md, table, with_interval  # noqa: F401 (public names)
from lesionbench.class_damage import KEY, class_label, classes_hurt
from lesionbench.layer_score import DEFAULT_SCORE
from lesionbench.scores import METHOD, Bootstrap, at_chance, layer_scores
from lesionbench.store import CLEAN, Outcomes

__all__ = [
    "build_leaderboard",
    "render",
    "render_pages",
    "reporter",
    "track_bootstraps",
    "evaluation_seconds",
    "model_page",
    "metric_of",
    "relative_link",
    "md",
    "table",
    "with_interval",
    "format_critical",
    "grid_text",
    "images_per_class",
    "most_fragile_layers",
    "ranked_perturbations",
    "LEADERBOARD_PAGE",
    "MODEL_PAGES",
]

# What a track is called when its manifest gives no dataset title: the data, not the plugin.
KNOWN_TITLES = {"fashion_mnist": "Fashion-MNIST"}
MIN_CLASS_IMAGES = 10  # fewer images per class: a per-class accuracy is too coarse to name classes
LEADERBOARD_PAGE = "LEADERBOARD.md"
MODEL_PAGES = "models"  # folder of the per-model pages, beside the leaderboard


def slug(dataset: str, model: str) -> str:
    """A model's page name on one track: ``<dataset>--<model>``, lower-case, [a-z0-9-] only."""
    return f"{_slug(dataset)}--{_slug(model)}"


def model_page(dataset: str, model: str) -> str:
    """The relative path of a model's Markdown page on one track (``models/<dataset>--<model>.md``)."""
    return f"{MODEL_PAGES}/{slug(dataset, model)}.md"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "x"


def build_leaderboard(
    df: pd.DataFrame,
    metrics: Mapping[str, str] | None = None,
    plot_links: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    title: str = "lesionbench leaderboard",
    sources: Sequence[str] = (),
    outcomes: Outcomes | None = None,
    titles: Mapping[str, str] | None = None,
    boots: Mapping[str, Bootstrap] | None = None,
    per_class: Mapping[str, pd.DataFrame] | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
    headlines: Mapping[str, str] | None = None,
    score: str = DEFAULT_SCORE,
) -> Leaderboard:
    """The leaderboard of a results table (the store's columns) as plain data.

    ``metrics`` maps dataset → score metric (default top1); ``plot_links`` maps model → [(label,
    path relative to the main document)]; ``titles`` dataset → the track's title (default
    :data:`KNOWN_TITLES`, else the dataset's name); ``outcomes`` (with the table's ``outcome``
    column) give intervals, or ``boots`` (dataset → :class:`lesionbench.scores.Bootstrap`) already
    computed; ``per_class`` (dataset → :func:`lesionbench.per_class_accuracy`'s table) adds the
    classes each model's most fragile layers hurt most, named by ``class_names`` (dataset → name per
    label); ``headlines`` (dataset → relative path of the track's headline figure); ``score``: the
    layer score's registered name (default ``area``). Raises what
    :func:`lesionbench.scores.bootstrap` raises for outcomes that do not match the table."""
    metrics = dict(metrics or {})
    plot_links = dict(plot_links or {})
    titles = {**KNOWN_TITLES, **dict(titles or {})}
    boots = dict(boots) if boots is not None else track_bootstraps(df, outcomes, metrics, score=score)
    tracks = []
    for dataset, dg in df.groupby("dataset", sort=True):
        metric = metrics.get(dataset, "top1")
        boot = boots.get(dataset)
        scores = boot.layers if boot is not None else layer_scores(dg, metric, score)
        track = _track(
            dataset,
            titles.get(dataset, dataset),
            metric,
            dg,
            scores,
            boot,
            (per_class or {}).get(dataset),
            (class_names or {}).get(dataset),
        )
        track.headline = (headlines or {}).get(dataset)
        for page in track.models:
            page.plots = [Link(label, path) for label, path in plot_links.get(page.model, ())]
        tracks.append(track)
    info = None
    if boots:
        any_boot = next(iter(boots.values()))
        info = BootstrapInfo(METHOD, int(any_boot.replicates), int(any_boot.seed))
    return Leaderboard(title, [str(s) for s in sources], info, tracks)


def _track(
    dataset: str,
    title: str,
    metric: str,
    dg: pd.DataFrame,
    scores: pd.DataFrame,
    boot: Bootstrap | None,
    per_class: pd.DataFrame | None,
    class_names: Sequence[str] | None,
) -> Track:
    facts = model_facts(dg).set_index("model")
    models = sorted(scores["model"].unique())
    shared, partial, regridded = ranked_perturbations(dg, scores)
    ranks = ranking(boot, scores, dataset, shared, models)
    entries = []
    for r in ranks.itertuples():
        m, f = r.model, facts.loc[r.model]
        mine = scores[(scores["model"] == m) & scores["perturbation"].isin(shared)]
        weakest = first = last = None
        if not mine.empty:
            w = mine.loc[mine["score"].idxmin()]
            firsts = mine.sort_values("layer_index").groupby("perturbation")["score"]
            weakest = Weakest(str(w.layer), num(w.score), str(w.perturbation))
            first, last = num(firsts.first().mean()), num(firsts.last().mean())
        used = dg[(dg["model"] == m) & dg["perturbation"].isin(shared)]
        clean = dg[(dg["model"] == m) & (dg["perturbation"] == CLEAN)]
        entries.append(
            Entry(
                model=m,
                page=slug(dataset, m),
                rank=int(r.rank) if shared else None,
                clean_top1=num(f.clean_top1),
                clean_top5=num(f.clean_top5),
                overall=Score(num(r.overall), num(r.low), num(r.high)),
                perturbations={p: Score(*map(num, mean_score(boot, mine, m, dataset, p))) for p in shared},
                weakest=weakest,
                first_layer=first,
                last_layer=last,
                n_images=int(f.n_images),
                draws=draws_range(used),
                images_per_s=num(f.images_per_s),
                device=str(f.device),
                study_seconds=evaluation_seconds(used, clean),
            )
        )
    unscored = [
        Unscored(
            r.model,
            slug(dataset, r.model),
            num(facts.loc[r.model].clean_top1),
            num(facts.loc[r.model].clean_top5),
            float(r.clean),
            float(r.n_images),
            float(r.chance),
        )
        for r in at_chance(dg, metric).itertuples()
    ]
    pages = [_model_page(dataset, m, scores[scores["model"] == m], boot) for m in ranks["model"]]
    pages += [ModelPage(u.model, u.page, unscored=u) for u in unscored]
    return Track(
        dataset,
        title,
        metric,
        shared,
        partial,
        regridded,
        entries,
        unscored,
        None,
        _grids(dg),
        _depth(scores),
        _class_damage(per_class, scores, shared, class_names),
        pages,
    )


def _grids(dg: pd.DataFrame) -> list[Grid]:
    """Which level grid (and unit) each perturbation used, per model where the models differ."""
    grids = level_grids(dg)
    units = dg[dg["perturbation"] != CLEAN].groupby("perturbation")["level_unit"].first() if "level_unit" in dg else {}
    everyone = grids["model"].nunique()
    out = []
    for p, g in grids.groupby("perturbation", sort=True):
        unit = str(units.get(p, "")) if len(units) else ""
        if g["grid"].nunique() == 1:
            who = None if len(g) == everyone else sorted(g["model"])
            out.append(Grid(p, who, list(g["grid"].iloc[0]), unit))
        else:
            out += [Grid(p, [r.model], list(r.grid), unit) for r in g.itertuples()]
    return out


def _depth(scores: pd.DataFrame) -> list[Depth]:
    """What each perturbation shows about where the fragile layers are, over every model it was run on."""
    out = []
    for p in sorted(scores["perturbation"].unique()):
        g = scores[scores["perturbation"] == p]
        w = g.loc[g["score"].idxmin()]
        out.append(
            Depth(p, int(g["model"].nunique()), *map(num, depth_thirds(g)), str(w.model), str(w.layer), num(w.score))
        )
    return out


def _class_damage(
    per_class: pd.DataFrame | None,
    scores: pd.DataFrame,
    shared: list[str],
    class_names: Sequence[str] | None,
    k: int = 2,
) -> ClassDamage | None:
    """Which ``k`` classes each model's most fragile layer (per ranked perturbation) hurts most, and least."""
    if per_class is None or per_class.empty or not shared:
        return None
    pc = per_class[per_class["perturbation"].isin(shared)]
    fewest, most = images_per_class(pc)
    if fewest < MIN_CLASS_IMAGES:
        return ClassDamage(fewest, most, MIN_CLASS_IMAGES, [])
    hurt = classes_hurt(pc, most_fragile_layers(scores[scores["perturbation"].isin(shared)]))
    records = []
    for (model, _dataset, perturbation), g in hurt.groupby(KEY, sort=True):
        g = g.sort_values("rank")
        named = [ClassScore(class_label(r["class"], class_names), float(r["retention"])) for _, r in g.iterrows()]
        records.append(ClassHurt(str(model), str(perturbation), str(g["layer"].iloc[0]), named[:k], named[-1]))
    return ClassDamage(fewest, most, MIN_CLASS_IMAGES, records)


def _model_page(dataset: str, model: str, scores: pd.DataFrame, boot: Bootstrap | None) -> ModelPage:
    fragile = []
    for p in sorted(scores["perturbation"].unique()):
        g = scores[scores["perturbation"] == p].sort_values(["score", "layer_index"])
        w = g.iloc[0]
        item = Fragile(p, str(w.layer), _score(w), str(w.verdict))
        if len(g) > 1:
            r = g.iloc[1]
            item.runner_up, item.runner_up_score = str(r.layer), num(r.score)
            item.apart = boot.distinguishable(g.index[0], g.index[1]) if boot is not None else None
        fragile.append(item)
    tables = []
    for group in layer_groups(scores):
        sub = scores[scores["perturbation"].isin(group)]
        rows = []
        for (index, layer), lg in sub.groupby(["layer_index", "layer"], sort=True):
            cells = {}
            for p in group:
                r = lg[lg["perturbation"] == p].iloc[0]
                critical = Score(
                    float(r.critical_level),
                    num(getattr(r, "critical_low", np.nan)),
                    num(getattr(r, "critical_high", np.nan)),
                )
                cells[p] = Cell(_score(r), str(r.verdict), critical, float(r.max_level), str(r.level_axis))
            rows.append(LayerRow(str(layer), int(index), num(lg["relative_depth"].iloc[0]), cells))
        tables.append(LayerTable(list(group), rows))
    return ModelPage(model, slug(dataset, model), fragile, tables)


def _score(r) -> Score:
    return Score(num(r.score), num(getattr(r, "score_low", np.nan)), num(getattr(r, "score_high", np.nan)))


def reporter(name: str, registry=None):
    """The reporter registered under ``name`` (``md``, ``json``, ``html`` or a plugin's); raises
    LesionbenchError naming the valid ones for an unknown name."""
    from lesionbench.registry import get_registry

    return (registry or get_registry()).get("reporters", name)


def render(data: Leaderboard | pd.DataFrame, *args, format: str = "md", registry=None, **kwargs) -> str:
    """The leaderboard as one self-contained document in ``format`` (a reporter's name: ``md``,
    ``json``, ``html`` or a plugin's), model details inline rather than on pages of their own:
    ``render(board, "json")``. ``data`` is :func:`build_leaderboard`'s result, or a results table
    (then ``args``/``kwargs`` are :func:`build_leaderboard`'s and ``format`` is keyword-only).
    Raises LesionbenchError for an unknown format."""
    from lesionbench.reporters import MAIN

    if isinstance(data, pd.DataFrame):
        data = build_leaderboard(data, *args, **kwargs)
    elif args:
        (format,) = args
    return reporter(format, registry).render(data, single=True)[MAIN]


def render_pages(df: pd.DataFrame, *args, model_pages: bool = True, **kwargs) -> dict[str, str]:
    """The Markdown leaderboard of a results table as pages: relative path → text, the main one
    under :data:`LEADERBOARD_PAGE`, each model's on its own page (:func:`model_page`) unless
    ``model_pages`` is False (arguments as :func:`build_leaderboard`)."""
    from lesionbench.reporters import MAIN

    pages = dict(reporter("md").render(build_leaderboard(df, *args, **kwargs), single=not model_pages))
    return {LEADERBOARD_PAGE: pages.pop(MAIN), **pages}


def metric_of(results_path: Path, default: str = "top1") -> str:
    """The study metric recorded in the manifest beside a results file, if any (a damaged manifest,
    or one naming an unknown metric, raises LesionbenchError)."""
    from lesionbench.schema import manifest_beside

    manifest = manifest_beside(results_path)
    return manifest["study"].get("metric", default) if manifest is not None else default


def relative_link(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()
