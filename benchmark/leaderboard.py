"""Markdown leaderboard rendered from results tables — never edited by hand.

First, one table per track (dataset), models ranked by overall robustness (the mean over
perturbations of the mean layer score) over the perturbations every model of the track was studied
under with the same level grid, every column of it using those perturbations only, with the track's
headline figure. Then how to read them, and per track the level grids and where the fragile layers
are per perturbation. Per model (a page of its own with :func:`render_pages`): the most fragile layer
under each perturbation and narrow layer tables (perturbations grouped by the layers they studied).
With per-image outcomes every score carries its 95% bootstrap interval (``0.87 [0.84, 0.90]``)
and models that cannot be told apart share a rank (:func:`lesionbench.scores.bootstrap`).
Tables are written with ``DataFrame.to_markdown`` (tabulate).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionbench.class_damage import classes_hurt, hurt_lines
from lesionbench.layer_score import DEFAULT_SCORE
from lesionbench.scores import (BOOTSTRAP_SEED, METHOD, NOT_SCORED, REPLICATES, Bootstrap, at_chance, bootstrap,
                                clean_accuracy, interval, layer_scores)  # fmt: skip
from lesionbench.store import CLEAN, Outcomes

# What a track is called when its manifest gives no dataset title: the data, not the plugin.
KNOWN_TITLES = {"fashion_mnist": "Fashion-MNIST"}
MAX_COLUMNS = 3  # perturbations per layer table (each takes a score and a p½ column)
MAX_RANKED_COLUMNS = 4  # more ranked perturbations than this: their means go to a table of their own
MIN_CLASS_IMAGES = 10  # fewer images per class: a per-class accuracy is too coarse to name classes

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~])")


def md(text: object) -> str:
    """Escape a name for a Markdown table cell: names come from models and plugins, not from us."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def _fmt(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_critical(value: float, max_level: float, axis: str = "linear") -> str:
    """A critical level p½, or "> max" ("< min" for bits) when retention never fell to one half."""
    if math.isinf(value):
        return f"< {max_level:g}" if axis == "descending" else f"> {max_level:g}"
    return f"{value:.2g}" if abs(value) < 0.01 and value != 0 else f"{value:.2f}"


def model_facts(df: pd.DataFrame) -> pd.DataFrame:
    """Per model × dataset: clean top-1/top-5, full-pass throughput, device and images (from the
    clean evaluation; the fastest when several studies ran the model)."""
    clean1 = clean_accuracy(df, "top1").rename(columns={"clean": "clean_top1"}).drop(columns="chance")
    clean5 = clean_accuracy(df, "top5").rename(columns={"clean": "clean_top5"}).drop(columns="chance")
    clean = df[df["perturbation"] == CLEAN].sort_values("images_per_s", ascending=False, kind="stable")
    # several studies of one model: the fastest clean pass, as timeit takes the best of its repeats
    clean = clean.drop_duplicates(["model", "dataset"])[["model", "dataset", "images_per_s", "device", "n_images"]]
    return clean1.merge(clean5, on=["model", "dataset"]).merge(clean, on=["model", "dataset"])


def table(rows: Sequence[Mapping[str, str]] | pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A Markdown (GitHub pipe) table of already formatted strings, by ``DataFrame.to_markdown``."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=columns)
    return frame.to_markdown(index=False, tablefmt="github", disable_numparse=True)


def with_interval(value: float, low: float = float("nan"), high: float = float("nan"), digits: int = 2) -> str:
    """``0.87 [0.84, 0.90]``, or ``0.87`` without an interval."""
    if low == low and high == high and low is not None:
        return f"{_fmt(value, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"
    return _fmt(value, digits)


def critical_with_interval(r) -> str:
    """A layer's p½ with its interval, as :func:`format_critical` writes each end."""
    text = format_critical(r.critical_level, r.max_level, r.level_axis)
    low, high = getattr(r, "critical_low", float("nan")), getattr(r, "critical_high", float("nan"))
    if low == low and high == high and not (np.isinf(low) and np.isinf(high)):  # both ends "never": no interval to show
        ends = [format_critical(v, r.max_level, r.level_axis).replace("> ", ">").replace("< ", "<") for v in (low, high)]
        text += f" [{ends[0]}, {ends[1]}]"
    return text


def grid_text(levels: Sequence[float]) -> str:
    """A level grid in a few characters: ``0, 0.1, …, 1 (11)`` for an even grid, else every level."""
    levels = sorted(float(v) for v in levels)
    if len(levels) > 4:
        steps = np.diff(levels)
        if np.allclose(steps, steps[0], rtol=1e-6, atol=1e-12):
            return f"{levels[0]:g}, {levels[1]:g}, …, {levels[-1]:g} ({len(levels)})"
    return ", ".join(f"{v:g}" for v in levels)


def level_grids(scores_df: pd.DataFrame) -> pd.DataFrame:
    """Per model × perturbation of a results table: its level grid (a tuple of the levels run)."""
    cells = scores_df[scores_df["perturbation"] != CLEAN]
    grids = cells.groupby(["model", "perturbation"])["level"].agg(lambda v: tuple(sorted(set(float(x) for x in v))))
    return grids.rename("grid").reset_index()


def evaluation_seconds(cells: pd.DataFrame, clean: pd.DataFrame) -> float:
    """Seconds spent evaluating ``cells`` (rows of one model that did not fail).

    A level that leaves the network as it is (level 0 of a knockout) is not evaluated: its row is
    the clean pass's. Runs now record 0 s for it; older ones (before 2026-11-30) copied the clean pass's
    seconds (of the pass the run made when it started or resumed) into each such row, which counted
    one clean pass per layer × perturbation again; so a level-0 row whose top-1, top-5 and loss equal
    a clean row's of the model exactly is left out too."""
    ok = cells[cells["error"].fillna("") == ""]
    same = [c for c in ("top1", "top5", "loss") if c in ok.columns and c in clean.columns]
    copied = pd.MultiIndex.from_frame(ok[same]).isin(pd.MultiIndex.from_frame(clean[same]))
    reused = copied & (ok["level"] == 0.0).to_numpy()
    return float(ok.loc[~reused, "seconds"].sum())


def draws_text(df: pd.DataFrame) -> str:
    """How many draws stand behind each level: ``2``, or ``5–20`` (adaptive draws)."""
    counts = df[df["perturbation"] != CLEAN].groupby(["layer", "perturbation", "level"]).size()
    if counts.empty:
        return "–"
    spread = counts[counts > 1] if (counts > 1).any() else counts
    low, high = int(spread.min()), int(spread.max())
    return str(low) if low == high else f"{low}–{high}"


def track_bootstraps(df: pd.DataFrame, outcomes: Outcomes | None, metrics: Mapping[str, str] | None = None,
                     replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED,
                     score: str = DEFAULT_SCORE) -> dict[str, Bootstrap]:  # fmt: skip
    """One bootstrap per track (dataset) that has per-image outcomes, with the track's metric and
    the layer score ``score`` (a registered score's name)."""
    if outcomes is None or len(outcomes) == 0 or "outcome" not in df.columns or not (df["outcome"] >= 0).any():
        return {}
    metrics = dict(metrics or {})
    out = {}
    for dataset, dg in df.groupby("dataset", sort=True):
        if (dg["outcome"] >= 0).any():
            out[dataset] = bootstrap(dg, outcomes, metrics.get(dataset, "top1"), replicates, seed, score=score)
    return out


def render(df: pd.DataFrame, *args, **kwargs) -> str:
    """The leaderboard for a results table as one Markdown text, the per-model sections at its end
    under ``### <model>`` (arguments as :func:`render_pages`, less ``model_pages``)."""
    return render_pages(df, *args, model_pages=False, **kwargs)[LEADERBOARD_PAGE]


LEADERBOARD_PAGE = "LEADERBOARD.md"
MODEL_PAGES = "models"  # folder of the per-model pages, beside the leaderboard


def model_page(dataset: str, model: str) -> str:
    """The relative path of a model's page on one track (``models/<dataset>--<model>.md``)."""
    return f"{MODEL_PAGES}/{_slug(dataset)}--{_slug(model)}.md"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "x"


def render_pages(
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
    model_pages: bool = True,
    score: str = DEFAULT_SCORE,
) -> dict[str, str]:
    """The leaderboard as pages: relative path → Markdown text.

    ``metrics`` maps dataset → score metric (default top1); ``plot_links`` maps model → [(label,
    relative path)]; ``titles`` dataset → the track's title (default :data:`KNOWN_TITLES`, else the
    dataset's name); ``outcomes`` (with the table's ``outcome`` column) give intervals, or ``boots``
    (dataset → :class:`Bootstrap`) already computed; ``per_class`` (dataset →
    :func:`lesionbench.per_class_accuracy`'s table) adds the classes each model's most fragile layers
    hurt most, named by ``class_names`` (dataset → name per label); ``headlines`` (dataset → relative
    path of the track's headline figure) embeds that figure under the track's ranked table.

    ``LEADERBOARD.md`` opens with each track's ranked table and its headline figure, then how to
    read them, then each track's details (level grids, fragile layers per perturbation, classes
    hurt). With ``model_pages`` each model's layer tables are a page of their own
    (:func:`model_page`, linked from the ranked table; plot links made relative to it); without,
    they follow on the same page under ``### <model>``. ``score``: the layer score's registered name."""
    metrics = dict(metrics or {})
    plot_links = dict(plot_links or {})
    titles = {**KNOWN_TITLES, **dict(titles or {})}
    headlines = dict(headlines or {})
    boots = dict(boots) if boots is not None else track_bootstraps(df, outcomes, metrics, score=score)
    ranked, details, models_md, pages = [], [], [], {}
    for dataset, dg in df.groupby("dataset", sort=True):
        metric = metrics.get(dataset, "top1")
        boot = boots.get(dataset)
        scores = boot.layers if boot is not None else layer_scores(dg, metric, score)
        track_title = titles.get(dataset, dataset)
        link = (lambda m, d=dataset: model_page(d, m)) if model_pages else (lambda m: f"#{_anchor(m)}")
        head, detail, sections = _track(dataset, track_title, metric, dg, scores, boot, link,
                                        (per_class or {}).get(dataset), (class_names or {}).get(dataset))
        if dataset in headlines:
            head += [f"![Layer score against depth, {md(track_title)}]({headlines[dataset]})", ""]
        ranked += head
        details += detail
        for m, lines in sections.items():
            links = plot_links.get(m, ())
            if model_pages:
                up = [(label, path if "://" in path or path.startswith("/") else f"../{path}") for label, path in links]
                body = lines[4:] + _plot_lines(up)
                pages[model_page(dataset, m)] = "\n".join(
                    [f"# {md(m)} — {md(track_title)}", "", f"[← the leaderboard](../{LEADERBOARD_PAGE}) · scores "
                     f"from {metric}; how to read them: the leaderboard's *How to read these tables*.", "", *body]
                ).rstrip() + "\n"  # fmt: skip
            else:
                models_md += lines + _plot_lines(links)
    lines = [f"# {title}", "", "Rendered by lesionbench from the result files listed under Sources; do not edit by hand.", ""]
    lines += ranked
    lines += ["## How to read these tables", ""]
    lines += [
        "**Layer-robustness score**: area under the retention curve r(p) = clip((acc(p) − chance) / "
        "(acc(0) − chance), 0, 1) over the level range, divided by the range — 1 means the layer's "
        "damage never cost accuracy, 0 means chance from the first step. It depends on the level grid, so "
        "models are ranked only on perturbations run with the same grid. **p½**: the level where r "
        "first falls to 0.5. **Verdicts**: a layer is *critical* when its score's 95% interval lies below 0.50 "
        "(printed **bold**), *robust* when it lies at or above 0.50, *undetermined* when it contains 0.50 (printed "
        "_italic_); without an interval, from the score alone. A model whose clean accuracy is not beyond chance "
        "(one-sided binomial test, level 0.05) is not scored.",
        "",
    ]
    if boots:
        any_boot = next(iter(boots.values()))
        lines += [
            f"**Intervals**: 95%, by a {METHOD}; {any_boot.replicates} replicates, seed {any_boot.seed} "
            "(`lesionbench.scores.bootstrap`). Models share a rank when the paired bootstrap interval of the "
            "difference of their overall scores includes 0 (rank = 1 + the models ahead beyond doubt). Scores "
            "without an interval come from runs made before per-image outcomes were kept, or from a single draw "
            "per level of a random damage (its between-draw variance cannot be estimated); models without one are "
            "ranked by the point value, not beyond doubt.",
            "",
        ]
    else:
        lines += [
            "**Intervals**: none — these runs were made before per-image outcomes (`outcomes.arrow`) were kept; "
            "a run made now gets a 95% paired-bootstrap interval on every score.",
            "",
        ]
    if sources:
        lines += ["Sources: " + ", ".join(f"`{md(s)}`" for s in sources), ""]
    lines += details + models_md
    pages[LEADERBOARD_PAGE] = "\n".join(lines).rstrip() + "\n"
    return pages


def _plot_lines(links: Sequence[tuple[str, str]]) -> list[str]:
    return ["Plots: " + " · ".join(f"[{md(label)}]({path})" for label, path in links), ""] if links else []


def ranked_perturbations(dg: pd.DataFrame, scores: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """(ranked, not run on every model, run on different grids): the perturbations of one track that
    every model was studied under with the same level grid, and those left out of the ranking."""
    models = scores["model"].unique()
    grids = level_grids(dg)
    shared, partial, regridded = [], [], []
    for p in sorted(scores["perturbation"].unique()):
        g = grids[grids["perturbation"] == p]
        if len(g) < len(models):
            partial.append(p)
        elif g["grid"].nunique() > 1:
            regridded.append(p)
        else:
            shared.append(p)
    return shared, partial, regridded


def _track(dataset: str, title: str, metric: str, dg: pd.DataFrame, scores: pd.DataFrame, boot: Bootstrap | None,
           link, per_class: pd.DataFrame | None = None,
           class_names: Sequence[str] | None = None) -> tuple[list[str], list[str], dict[str, list[str]]]:  # fmt: skip
    """(the ranked table's lines, the track's detail lines, model → its section's lines); ``link(model)``
    is where the ranked table points for a model's layer tables."""
    facts = model_facts(dg).set_index("model")
    models = sorted(scores["model"].unique())
    perts = sorted(scores["perturbation"].unique())
    grids = level_grids(dg)
    shared, partial, regridded = ranked_perturbations(dg, scores)
    left_out = ([f"not run on every model: {', '.join(map(md, partial))}"] if partial else []) + (
        [f"run on different level grids: {', '.join(map(md, regridded))}"] if regridded else [])  # fmt: skip
    name = f" (`{md(dataset)}`)" if title != dataset else ""
    lines = [f"## Track: {md(title)}{name} — scores from {metric}", ""]
    if shared:
        lines.append("Ranked on " + ", ".join(md(p) for p in shared) + ": the perturbations every model of the track "
                     "was studied under, with the same level grid; every column below uses these only.")  # fmt: skip
    else:
        lines.append("No perturbation was run on every model with the same level grid: the models are not ranked.")
    if left_out:
        lines[-1] += " Not ranked — " + "; ".join(left_out) + "."
    lines.append("")
    ranking = _ranking(boot, scores, dataset, shared, models) if models else pd.DataFrame(
        columns=["model", "overall", "low", "high", "rank"])  # every model at chance: none scored
    inline = len(shared) <= MAX_RANKED_COLUMNS
    rows, per_pert = [], {md(p): {"perturbation": md(p)} for p in shared}
    for r in ranking.itertuples():
        m = r.model
        f = facts.loc[m]
        mine = scores[(scores["model"] == m) & scores["perturbation"].isin(shared)]
        row = {"#": str(r.rank) if shared else "–", "model": f"[{md(m)}]({link(m)})",
               "clean top-1": _fmt(f.clean_top1, 3), "clean top-5": _fmt(f.clean_top5, 3),
               "overall": with_interval(r.overall, r.low, r.high)}  # fmt: skip
        for p in shared:
            value = with_interval(*_mean_score(boot, mine, m, dataset, p))
            if inline:
                row[md(p)] = value
            per_pert[md(p)][md(m)] = value
        if not mine.empty:
            w = mine.loc[mine["score"].idxmin()]
            firsts = mine.sort_values("layer_index").groupby("perturbation")["score"]
            row["weakest layer"] = f"{md(w.layer)} ({_fmt(w.score)}, {md(w.perturbation)})"
            row["first / last layer"] = f"{_fmt(firsts.first().mean())} / {_fmt(firsts.last().mean())}"
        else:
            row["weakest layer"] = row["first / last layer"] = "–"
        used = dg[(dg["model"] == m) & dg["perturbation"].isin(shared)]
        row["images × draws"] = f"{int(f.n_images)} × {draws_text(used)}"
        row["images/s"] = f"{f.images_per_s:,.0f}"
        row["device"] = md(f.device)
        row["study time"] = f"{evaluation_seconds(used, dg[(dg['model'] == m) & (dg['perturbation'] == CLEAN)]):,.0f} s"
        rows.append(row)
    unscored = at_chance(dg, metric)
    for r in unscored.itertuples():
        f = facts.loc[r.model]
        row = dict.fromkeys(rows[0] if rows else (), "–")
        rows.append({**row, "#": "–", "model": f"[{md(r.model)}]({link(r.model)})", "clean top-1":
                     _fmt(f.clean_top1, 3), "clean top-5": _fmt(f.clean_top5, 3), "overall": NOT_SCORED})  # fmt: skip
    lines += [table(rows), ""]
    lines += [
        "Overall: mean over the ranked perturbations of the mean layer score. Weakest layer, first / last layer "
        "(mean over the ranked perturbations), images × draws (evaluation images × random draws per level) and "
        "study time (all evaluations under the ranked perturbations) use the same perturbations; images/s: a "
        "full clean pass.",
        "",
    ]
    if not inline:
        lines += ["Mean layer score per ranked perturbation:", "", table(list(per_pert.values())), ""]
    details = [f"## Details: {md(title)}", ""]
    details += _grids_table(grids, dg)
    details += _by_perturbation(scores, perts)
    details += _class_damage(per_class, scores, shared, class_names)
    sections = {m: _model_section(m, scores[scores["model"] == m], boot, ()) for m in ranking["model"]}
    for r in unscored.itertuples():
        sections[r.model] = [f'<a id="{_anchor(r.model)}"></a>', "", f"### {md(r.model)}", "",
                             f"{NOT_SCORED} ({metric} {r.clean:.3f} on {r.n_images:g} images, chance {r.chance:g}): "
                             "were its weights loaded?", ""]  # fmt: skip
    return lines, details, sections


def _ranking(boot: Bootstrap | None, scores: pd.DataFrame, dataset: str, shared: list[str], models: list[str]) -> pd.DataFrame:
    """model, overall, low, high, rank: with ties from the bootstrap, or by the point value."""
    if boot is not None and shared:
        return boot.overall(dataset, shared, models)
    s = scores[scores["perturbation"].isin(shared)]
    overall = {m: float(s[s["model"] == m].groupby("perturbation")["score"].mean().mean()) if shared else float("nan")
               for m in models}  # fmt: skip
    out = pd.DataFrame({"model": models, "overall": [overall[m] for m in models], "low": np.nan, "high": np.nan})
    out = out.sort_values("overall", ascending=False, ignore_index=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


def _mean_score(boot: Bootstrap | None, mine: pd.DataFrame, model: str, dataset: str, p: str) -> tuple[float, float, float]:
    """A model's mean layer score under one perturbation, with its interval when there is one."""
    value = float(mine.loc[mine["perturbation"] == p, "score"].mean())
    if boot is None:
        return value, float("nan"), float("nan")
    low, high = interval(boot.overall_reps(model, dataset, [p]))
    return value, low, high


def _grids_table(grids: pd.DataFrame, dg: pd.DataFrame) -> list[str]:
    """Which level grid (and unit) each perturbation used, per model where the models differ."""
    units = dg[dg["perturbation"] != CLEAN].groupby("perturbation")["level_unit"].first() if "level_unit" in dg else {}
    rows = []
    everyone = grids["model"].nunique()
    for p, g in grids.groupby("perturbation", sort=True):
        unit = md(units.get(p, "")) if len(units) else ""
        if g["grid"].nunique() == 1:
            who = "all" if len(g) == everyone else ", ".join(md(m) for m in sorted(g["model"]))
            rows.append({"perturbation": md(p), "models": who, "levels": grid_text(g["grid"].iloc[0]),
                         "unit": unit or "–"})  # fmt: skip
        else:
            for r in g.itertuples():
                rows.append({"perturbation": md(p), "models": md(r.model), "levels": grid_text(r.grid), "unit": unit or "–"})
    return ["Level grids (a score is comparable only with scores on the same grid):", "", table(rows), ""]


def _by_perturbation(scores: pd.DataFrame, perts: list[str]) -> list[str]:
    """What each perturbation shows about where the fragile layers are, over every model it was run on."""
    rows = []
    for p in perts:
        g = scores[scores["perturbation"] == p]
        third = np.minimum((g["relative_depth"].fillna(0.0) * 3).astype(int), 2)
        means = [g.loc[third == t, "score"].mean() for t in range(3)]
        w = g.loc[g["score"].idxmin()]
        rows.append({"perturbation": md(p), "models": str(g["model"].nunique()),
                     **{name: _fmt(m) if m == m else "–" for name, m in zip(("early", "middle", "late"), means)},
                     "most fragile layer": f"{md(w.model)}: {md(w.layer)} ({w.score:.2f})"})  # fmt: skip
    return [
        "Where the fragile layers are, per perturbation (mean layer score of the first, middle and last "
        "third of each network's studied layers, and the single most fragile layer):",
        "",
        table(rows),
        "",
    ]


def most_fragile_layers(scores: pd.DataFrame) -> pd.DataFrame:
    """Per model × perturbation the layer with the lowest layer score (ties: the earlier layer), the
    layer :func:`fragile_line` names: columns model, perturbation, layer, layer_index, score."""
    g = scores.sort_values(["model", "perturbation", "score", "layer_index"], kind="stable")
    return g.drop_duplicates(["model", "perturbation"])[["model", "perturbation", "layer", "layer_index", "score"]]


def images_per_class(per_class: pd.DataFrame) -> tuple[int, int]:
    """(fewest, most) images of one class behind a per-class table; (0, 0) when it is empty."""
    per_image = per_class.groupby(["model", "class"])["n_images"].max()
    return (int(per_image.min()), int(per_image.max())) if len(per_image) else (0, 0)


def _class_damage(per_class: pd.DataFrame | None, scores: pd.DataFrame, shared: list[str],
                  class_names: Sequence[str] | None) -> list[str]:  # fmt: skip
    """Which classes each model's most fragile layer (per ranked perturbation) hurts most."""
    if per_class is None or per_class.empty or not shared:
        return []
    pc = per_class[per_class["perturbation"].isin(shared)]
    fewest, most = images_per_class(pc)
    if fewest < MIN_CLASS_IMAGES:
        return [f"Classes hurt most: not named — this track has {fewest} image(s) of some classes (fewer than "
                f"{MIN_CLASS_IMAGES}), too few for a per-class accuracy.", ""]  # fmt: skip
    hurt = classes_hurt(pc, most_fragile_layers(scores[scores["perturbation"].isin(shared)]))
    hurt = hurt.assign(**{c: hurt[c].map(md) for c in ("model", "perturbation", "layer")})  # plugin names
    class_names = [md(n) for n in class_names] if class_names is not None else None
    return [
        f"Classes hurt most at each model's most fragile layer under each ranked perturbation (per-class retention "
        f"from the per-image outcomes, mean over the levels; {fewest if fewest == most else f'{fewest}–{most}'} "
        "images per class; "
        "the per-class heatmaps are under each model's plots):",
        "",
        *hurt_lines(hurt, k=2, class_names=class_names),
        "",
    ]


def _anchor(model: str) -> str:
    return "model-" + re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def fragile_line(scores: pd.DataFrame, p: str, boot: Bootstrap | None) -> str | None:
    """The most fragile layer under ``p``, with its interval, and whether the runner-up can be told apart."""
    g = scores[scores["perturbation"] == p].sort_values(["score", "layer_index"])
    if g.empty:
        return None
    w = g.iloc[0]
    text = (f"- Most fragile under {md(p)}: **{md(w.layer)}** (score "
            f"{with_interval(w.score, getattr(w, 'score_low', np.nan), getattr(w, 'score_high', np.nan))}, {w.verdict})")  # fmt: skip
    if len(g) > 1 and boot is not None:
        r = g.iloc[1]
        apart = boot.distinguishable(g.index[0], g.index[1])
        if apart is False:
            text += f"; the runner-up {md(r.layer)} ({_fmt(r.score)}) cannot be told apart from it"
        elif apart:
            text += f"; clearly below the runner-up {md(r.layer)} ({_fmt(r.score)})"
    return text + "."


def layer_groups(scores: pd.DataFrame) -> list[list[str]]:
    """The perturbations of one model grouped by the set of layers each studied, at most
    :data:`MAX_COLUMNS` to a group: one narrow table each, with no empty cells."""
    by_layers: dict[tuple, list[str]] = {}
    for p, g in scores.groupby("perturbation", sort=True):
        by_layers.setdefault(tuple(sorted(g["layer"])), []).append(p)
    groups = []
    for _layers, ps in sorted(by_layers.items(), key=lambda kv: (-len(kv[0]), kv[1])):
        groups += [ps[i : i + MAX_COLUMNS] for i in range(0, len(ps), MAX_COLUMNS)]
    return groups


def _model_section(model: str, scores: pd.DataFrame, boot: Bootstrap | None, links) -> list[str]:
    lines = [f'<a id="{_anchor(model)}"></a>', "", f"### {md(model)}", ""]
    perts = sorted(scores["perturbation"].unique())
    lines += [line for p in perts if (line := fragile_line(scores, p, boot))]
    lines.append("")
    for group in layer_groups(scores):
        sub = scores[scores["perturbation"].isin(group)]
        rows = []
        for (_index, layer), lg in sub.groupby(["layer_index", "layer"], sort=True):
            row = {"layer": md(layer), "depth": f"{lg['relative_depth'].iloc[0]:.2f}"}
            for p in group:
                r = lg[lg["perturbation"] == p].iloc[0]
                mark = {"critical": "**", "undetermined": "_"}.get(r.verdict, "")
                low, high = getattr(r, "score_low", np.nan), getattr(r, "score_high", np.nan)
                row[f"{md(p)} score"] = f"{mark}{with_interval(r.score, low, high)}{mark}"
                row[f"{md(p)} p½"] = critical_with_interval(r)
            rows.append(row)
        lines += [table(rows), ""]
    lines += _plot_lines(links)
    return lines


def metric_of(results_path: Path, default: str = "top1") -> str:
    """The study metric recorded in the manifest beside a results file, if any (a damaged manifest,
    or one naming an unknown metric, raises LesionbenchError)."""
    from lesionbench.schema import manifest_beside

    manifest = manifest_beside(results_path)
    return manifest["study"].get("metric", default) if manifest is not None else default


def relative_link(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()

