"""The Markdown reporter (``--format md``): ``LEADERBOARD.md`` and a page per model and track in
``models/`` beside it.

First, one table per track, models ranked by overall robustness, with the track's headline figure.
Then how to read them, and per track the level grids and where the fragile layers are per
perturbation. Per model (a page of its own unless ``single``): the most fragile layer under each
perturbation and narrow layer tables (perturbations grouped by the layers they studied). Tables are
written with ``DataFrame.to_markdown`` (tabulate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lesionbench.board import ClassDamage, Entry, Leaderboard, ModelPage, Track
from lesionbench.board_text import (
    COLUMNS_NOTE,
    HOW_TO_READ,
    INTERVALS,
    NO_INTERVALS,
    critical_text,
    fmt,
    grid_text,
    md,
    not_scored,
    table,
    with_interval,
)
from lesionbench.hookspecs import hookimpl
from lesionbench.reporters import MAIN

LEADERBOARD_PAGE = "LEADERBOARD.md"  # what a model page links back to
MODEL_PAGES = "models"
MAX_RANKED_COLUMNS = 4  # more ranked perturbations than this: their means go to a table of their own


@dataclass(frozen=True)
class MarkdownReporter:
    name: str = "md"
    description: str = "Markdown: LEADERBOARD.md and a page per model and track in models/ beside it"
    suffix: str = ".md"

    def render(self, board: Leaderboard, single: bool = False) -> dict[str, str]:
        ranked, details, models_md, pages = [], [], [], {}
        for track in board.tracks:
            link = (lambda page: f"#{anchor(page.model)}") if single else (lambda page: page_path(page.page))
            ranked += _ranked(track, link)
            details += _details(track)
            for page in track.models:
                lines = _model_section(page, track.metric)
                if single:
                    models_md += lines + _plot_lines([(p.label, p.path) for p in page.plots])
                    continue
                up = [
                    (p.label, p.path if "://" in p.path or p.path.startswith("/") else f"../{p.path}")
                    for p in page.plots
                ]
                pages[page_path(page.page)] = (
                    "\n".join(
                        [
                            f"# {md(page.model)} — {md(track.title)}",
                            "",
                            f"[← the leaderboard](../{LEADERBOARD_PAGE}) · "
                            f"scores from {track.metric}; how to read them: the leaderboard's *How to read these tables*.",
                            "",
                            *lines[4:],
                            *_plot_lines(up),
                        ]
                    ).rstrip()
                    + "\n"
                )
        lines = [
            f"# {board.title}",
            "",
            "Rendered by lesionbench from the result files listed under Sources; do not edit by hand.",
            "",
            *ranked,
            "## How to read these tables",
            "",
            HOW_TO_READ,
            "",
        ]
        b = board.bootstrap
        lines += [INTERVALS.format(method=b.method, replicates=b.replicates, seed=b.seed) if b else NO_INTERVALS, ""]
        if board.sources:
            lines += ["Sources: " + ", ".join(f"`{md(s)}`" for s in board.sources), ""]
        lines += details + models_md
        return {MAIN: "\n".join(lines).rstrip() + "\n", **pages}


def page_path(page: str) -> str:
    """A model page's path relative to the leaderboard (``models/<dataset>--<model>.md``)."""
    return f"{MODEL_PAGES}/{page}.md"


def anchor(model: str) -> str:
    return "model-" + re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def draws_text(draws: list[int] | None) -> str:
    """``2``, or ``5–20`` (adaptive draws), or an en dash without damaged cells."""
    if draws is None:
        return "–"
    return str(draws[0]) if draws[0] == draws[1] else f"{draws[0]}–{draws[1]}"


def _ranked(track: Track, link) -> list[str]:
    shared = track.ranked
    left_out = ([f"not run on every model: {', '.join(map(md, track.partial))}"] if track.partial else []) + (
        [f"run on different level grids: {', '.join(map(md, track.regridded))}"] if track.regridded else []
    )
    name = f" (`{md(track.dataset)}`)" if track.title != track.dataset else ""
    lines = [f"## Track: {md(track.title)}{name} — scores from {track.metric}", ""]
    if shared:
        lines.append(
            "Ranked on " + ", ".join(md(p) for p in shared) + ": the perturbations every model of the track "
            "was studied under, with the same level grid; every column below uses these only."
        )
    else:
        lines.append("No perturbation was run on every model with the same level grid: the models are not ranked.")
    if left_out:
        lines[-1] += " Not ranked — " + "; ".join(left_out) + "."
    lines.append("")
    inline = len(shared) <= MAX_RANKED_COLUMNS
    pages = {p.model: p for p in track.models}
    rows, per_pert = [], {md(p): {"perturbation": md(p)} for p in shared}
    for e in track.entries:
        row = _entry_row(e, link(pages[e.model]))
        for p in shared:
            value = with_interval(e.perturbations[p].value, e.perturbations[p].low, e.perturbations[p].high)
            if inline:
                row[md(p)] = value
            per_pert[md(p)][md(e.model)] = value
        row.update(_entry_tail(e))
        rows.append(row)
    for u in track.unscored:
        row = dict.fromkeys(rows[0] if rows else (), "–")
        rows.append(
            {
                **row,
                "#": "–",
                "model": f"[{md(u.model)}]({link(pages[u.model])})",
                "clean top-1": fmt(u.clean_top1, 3),
                "clean top-5": fmt(u.clean_top5, 3),
                "overall": not_scored(),
            }
        )
    lines += [table(rows), "", COLUMNS_NOTE, ""]
    if not inline:
        lines += ["Mean layer score per ranked perturbation:", "", table(list(per_pert.values())), ""]
    if track.headline is not None:
        lines += [f"![Layer score against depth, {md(track.title)}]({track.headline})", ""]
    return lines


def _entry_row(e: Entry, link: str) -> dict[str, str]:
    return {
        "#": str(e.rank) if e.rank is not None else "–",
        "model": f"[{md(e.model)}]({link})",
        "clean top-1": fmt(e.clean_top1, 3),
        "clean top-5": fmt(e.clean_top5, 3),
        "overall": with_interval(e.overall.value, e.overall.low, e.overall.high),
    }


def _entry_tail(e: Entry) -> dict[str, str]:
    w = e.weakest
    return {
        "weakest layer": f"{md(w.layer)} ({fmt(w.score)}, {md(w.perturbation)})" if w else "–",
        "first / last layer": f"{fmt(e.first_layer)} / {fmt(e.last_layer)}" if w else "–",
        "images × draws": f"{e.n_images} × {draws_text(e.draws)}",
        "images/s": f"{e.images_per_s:,.0f}" if e.images_per_s is not None else "–",
        "device": md(e.device),
        "study time": f"{e.study_seconds:,.0f} s",
    }


def _details(track: Track) -> list[str]:
    grids = [
        {
            "perturbation": md(g.perturbation),
            "models": "all" if g.models is None else ", ".join(map(md, g.models)),
            "levels": grid_text(g.levels),
            "unit": md(g.unit) or "–",
        }
        for g in track.grids
    ]
    depth = [
        {
            "perturbation": md(d.perturbation),
            "models": str(d.models),
            **{n: fmt(v) for n, v in zip(("early", "middle", "late"), (d.early, d.middle, d.late))},
            "most fragile layer": f"{md(d.fragile_model)}: {md(d.fragile_layer)} ({fmt(d.fragile_score)})",
        }
        for d in track.depth
    ]
    return [
        f"## Details: {md(track.title)}",
        "",
        "Level grids (a score is comparable only with scores on the same grid):",
        "",
        table(grids),
        "",
        "Where the fragile layers are, per perturbation (mean layer score of the first, middle and last "
        "third of each network's studied layers, and the single most fragile layer):",
        "",
        table(depth),
        "",
        *_class_damage(track.class_damage),
    ]


def _class_damage(c: ClassDamage | None) -> list[str]:
    if c is None:
        return []
    if c.fewest < c.minimum:
        return [
            f"Classes hurt most: not named — this track has {c.fewest} image(s) of some classes (fewer than "
            f"{c.minimum}), too few for a per-class accuracy.",
            "",
        ]
    lines = []
    for h in sorted(c.hurt, key=lambda h: (md(h.model), md(h.perturbation))):
        most = ", ".join(f"{md(s.name)} ({s.retention:.2f})" for s in h.most)
        lines.append(
            f"- **{md(h.model)}**, {md(h.perturbation)} at {md(h.layer)}: hurt most {most}; least "
            f"{md(h.least.name)} ({h.least.retention:.2f}) — mean retention over levels"
        )
    images = c.fewest if c.fewest == c.most else f"{c.fewest}–{c.most}"
    return [
        f"Classes hurt most at each model's most fragile layer under each ranked perturbation (per-class retention "
        f"from the per-image outcomes, mean over the levels; {images} images per class; "
        "the per-class heatmaps are under each model's plots):",
        "",
        *lines,
        "",
    ]


def _plot_lines(links: list[tuple[str, str]]) -> list[str]:
    return ["Plots: " + " · ".join(f"[{md(label)}]({path})" for label, path in links), ""] if links else []


def _model_section(page: ModelPage, metric: str) -> list[str]:
    lines = [f'<a id="{anchor(page.model)}"></a>', "", f"### {md(page.model)}", ""]
    if page.unscored is not None:
        u = page.unscored
        return lines + [
            f"{not_scored()} ({metric} {u.clean:.3f} on {u.n_images:g} images, chance {u.chance:g}): "
            "were its weights loaded?",
            "",
        ]
    for f in page.fragile:
        text = (
            f"- Most fragile under {md(f.perturbation)}: **{md(f.layer)}** (score "
            f"{with_interval(f.score.value, f.score.low, f.score.high)}, {f.verdict})"
        )
        if f.apart is False:
            text += f"; the runner-up {md(f.runner_up)} ({fmt(f.runner_up_score)}) cannot be told apart from it"
        elif f.apart:
            text += f"; clearly below the runner-up {md(f.runner_up)} ({fmt(f.runner_up_score)})"
        lines.append(text + ".")
    lines.append("")
    for t in page.tables:
        rows = []
        for r in t.rows:
            row = {"layer": md(r.layer), "depth": fmt(r.depth)}
            for p in t.perturbations:
                c = r.cells[p]
                mark = {"critical": "**", "undetermined": "_"}.get(c.verdict, "")
                row[f"{md(p)} score"] = f"{mark}{with_interval(c.score.value, c.score.low, c.score.high)}{mark}"
                row[f"{md(p)} p½"] = critical_text(
                    c.critical.value, c.critical.low, c.critical.high, c.max_level, c.axis
                )
            rows.append(row)
        lines += [table(rows), ""]
    return lines


@hookimpl
def lesionbench_reporters():
    return [MarkdownReporter()]
