"""The HTML reporter (``--format html``): the leaderboard as one static page.

No external resource: the style sheet and a few lines of vanilla JavaScript (click a column header
to sort a table, again to reverse it) are inline, figures are ``<img>`` elements with the data's
relative paths (beside the page, as ``lesionbench leaderboard`` draws them). Every number cell
carries its unrounded value in ``data-value`` (``Infinity`` for a level never reached), which the
sorting uses; the text shows it as the Markdown reporter does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import escape

from lesionbench.board import Entry, Leaderboard, ModelPage, Score, Track
from lesionbench.board_text import (
    COLUMNS_NOTE,
    HOW_TO_READ,
    INTERVALS,
    NO_INTERVALS,
    critical_text,
    fmt,
    grid_text,
    not_scored,
    with_interval,
)
from lesionbench.hookspecs import hookimpl
from lesionbench.reporters import MAIN

IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif", ".webp")
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1250px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td[data-value]{white-space:nowrap}td.critical{font-weight:bold}td.undetermined{font-style:italic}
img{max-width:100%;height:auto}figure{margin:.5em 0}
"""
# Click a header: sort its table's rows by data-value (numbers) or text; again: the other way.
SCRIPT = """
function cellKey(td) {
  var v = td.getAttribute("data-value");
  if (v === null || v === "") { v = td.textContent.trim(); return v === "" || v === "\\u2013" ? null : v; }
  return Number(v);
}
function sortTable(table, column) {
  var th = table.tHead.rows[0].cells[column], ascending = th.getAttribute("aria-sort") !== "ascending";
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = cellKey(a.cells[column]), y = cellKey(b.cells[column]);
    if (x === null || y === null) { return (x === null) - (y === null); }
    var c = x < y ? -1 : (x > y ? 1 : 0);
    return ascending ? c : -c;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.querySelectorAll("table.sortable").forEach(function (table) {
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
    th.addEventListener("click", function () { sortTable(table, i); });
  });
  table.setAttribute("data-sortable", "ready");
});
"""


def _inline(text: str) -> str:
    """The leaderboard's fixed prose (Markdown emphasis and code) as HTML."""
    text = escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"(?<![\w])_(\w+)_(?![\w])", r"<i>\1</i>", text)
    text = re.sub(r"(?<!\*)\*([^*]+?)\*(?!\*)", r"<i>\1</i>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _value(x: float | None) -> str:
    return "" if x is None else repr(float(x)).replace("inf", "Infinity")


def _td(text: str, value: float | None = None, cls: str = "") -> str:
    attrs = f' data-value="{_value(value)}"' if value is not None else ""
    attrs += f' class="{cls}"' if cls else ""
    return f"<td{attrs}>{escape(text)}</td>"


def _table(head: list[tuple[str, str]], rows: list[list[str]], cls: str = "sortable") -> str:
    """``head``: (key, label) per column; ``rows``: already made ``<td>`` cells."""
    ths = "".join(f'<th data-key="{escape(k)}">{escape(label)}</th>' for k, label in head)
    body = "\n".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    return f'<table class="{cls}">\n<thead><tr>{ths}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def _score(s: Score, cls: str = "") -> str:
    return _td(with_interval(s.value, s.low, s.high), s.value, cls)


def _figure(path: str, alt: str) -> str:
    if path.lower().endswith(IMAGE_SUFFIXES):
        return f'<figure><img src="{escape(path)}" alt="{escape(alt)}" loading="lazy"><figcaption>{escape(alt)}</figcaption></figure>'
    return f'<p><a href="{escape(path)}">{escape(alt)}</a></p>'


def anchor(page: str) -> str:
    return "model-" + page


def _entry(e: Entry, ranked: list[str]) -> list[str]:
    w = e.weakest
    draws = "–" if e.draws is None else (str(e.draws[0]) if e.draws[0] == e.draws[1] else f"{e.draws[0]}–{e.draws[1]}")
    return [
        _td(str(e.rank) if e.rank is not None else "–", e.rank),
        f'<td><a href="#{anchor(e.page)}">{escape(e.model)}</a></td>',
        _td(fmt(e.clean_top1, 3), e.clean_top1),
        _td(fmt(e.clean_top5, 3), e.clean_top5),
        _score(e.overall),
        *(_score(e.perturbations[p]) for p in ranked),
        _td(f"{w.layer} ({fmt(w.score)}, {w.perturbation})" if w else "–"),
        _td(f"{fmt(e.first_layer)} / {fmt(e.last_layer)}" if w else "–"),
        _td(f"{e.n_images} × {draws}"),
        _td(fmt(e.images_per_s, 0), e.images_per_s),
        _td(e.device),
        _td(f"{e.study_seconds:,.0f} s", e.study_seconds),
    ]


def _track(t: Track) -> list[str]:
    name = f" (<code>{escape(t.dataset)}</code>)" if t.title != t.dataset else ""
    out = [
        f'<section id="track-{escape(t.dataset)}" data-dataset="{escape(t.dataset)}">',
        f"<h2>Track: {escape(t.title)}{name} — scores from {escape(t.metric)}</h2>",
    ]
    if t.ranked:
        out.append(
            f"<p>Ranked on {escape(', '.join(t.ranked))}: the perturbations every model of the track was "
            "studied under, with the same level grid; every column below uses these only.</p>"
        )
    else:
        out.append("<p>No perturbation was run on every model with the same level grid: the models are not ranked.</p>")
    for label, names in (
        ("Not ranked, not run on every model", t.partial),
        ("Not ranked, run on different level grids", t.regridded),
    ):
        if names:
            out.append(f"<p>{label}: {escape(', '.join(names))}.</p>")
    head = [
        ("rank", "#"),
        ("model", "model"),
        ("clean_top1", "clean top-1"),
        ("clean_top5", "clean top-5"),
        ("overall", "overall"),
        *((f"perturbation:{p}", p) for p in t.ranked),
        ("weakest", "weakest layer"),
        ("first_last", "first / last layer"),
        ("images_draws", "images × draws"),
        ("images_per_s", "images/s"),
        ("device", "device"),
        ("study_seconds", "study time"),
    ]
    rows = [_entry(e, t.ranked) for e in t.entries]
    rows += [
        [
            _td("–"),
            f'<td><a href="#{anchor(u.page)}">{escape(u.model)}</a></td>',
            _td(fmt(u.clean_top1, 3), u.clean_top1),
            _td(fmt(u.clean_top5, 3), u.clean_top5),
            _td(not_scored()),
            *[_td("–")] * (len(head) - 5),
        ]
        for u in t.unscored
    ]
    out += [_table(head, rows, "sortable ranked"), f"<p>{_inline(COLUMNS_NOTE)}</p>"]
    if t.headline:
        out.append(_figure(t.headline, f"Layer score against depth, {t.title}"))
    out.append(
        f"<h3>Details: {escape(t.title)}</h3><p>Level grids (a score is comparable only with scores on the "
        "same grid):</p>"
    )
    out.append(
        _table(
            [("perturbation", "perturbation"), ("models", "models"), ("levels", "levels"), ("unit", "unit")],
            [
                [
                    _td(g.perturbation),
                    _td("all" if g.models is None else ", ".join(g.models)),
                    _td(grid_text(g.levels)),
                    _td(g.unit or "–"),
                ]
                for g in t.grids
            ],
        )
    )
    out.append(
        "<p>Where the fragile layers are, per perturbation (mean layer score of the first, middle and last "
        "third of each network's studied layers, and the single most fragile layer):</p>"
    )
    out.append(
        _table(
            [
                ("perturbation", "perturbation"),
                ("models", "models"),
                ("early", "early"),
                ("middle", "middle"),
                ("late", "late"),
                ("fragile", "most fragile layer"),
            ],
            [
                [
                    _td(d.perturbation),
                    _td(str(d.models), d.models),
                    _td(fmt(d.early), d.early),
                    _td(fmt(d.middle), d.middle),
                    _td(fmt(d.late), d.late),
                    _td(f"{d.fragile_model}: {d.fragile_layer} ({fmt(d.fragile_score)})"),
                ]
                for d in t.depth
            ],
        )
    )
    c = t.class_damage
    if c is not None and c.fewest < c.minimum:
        out.append(
            f"<p>Classes hurt most: not named — this track has {c.fewest} image(s) of some classes (fewer than "
            f"{c.minimum}), too few for a per-class accuracy.</p>"
        )
    elif c is not None:
        items = "".join(
            f"<li><b>{escape(h.model)}</b>, {escape(h.perturbation)} at {escape(h.layer)}: hurt most "
            + ", ".join(f"{escape(s.name)} ({s.retention:.2f})" for s in h.most)
            + f"; least {escape(h.least.name)} ({h.least.retention:.2f})</li>"
            for h in c.hurt
        )
        out.append(
            f"<p>Classes hurt most at each model's most fragile layer under each ranked perturbation (mean "
            f"retention over the levels):</p><ul>{items}</ul>"
        )
    out += [_model(page, t) for page in t.models]
    out.append("</section>")
    return out


def _model(page: ModelPage, t: Track) -> str:
    out = [f'<section class="model" id="{anchor(page.page)}"><h4>{escape(page.model)} — {escape(t.title)}</h4>']
    if page.unscored is not None:
        u = page.unscored
        out.append(
            f"<p>{not_scored()} ({t.metric} {u.clean:.3f} on {u.n_images:g} images, chance {u.chance:g}): were "
            "its weights loaded?</p>"
        )
    items = []
    for f in page.fragile:
        text = f"Most fragile under {escape(f.perturbation)}: <b>{escape(f.layer)}</b> (score " + escape(
            f"{with_interval(f.score.value, f.score.low, f.score.high)}, {f.verdict})"
        )
        if f.apart is False:
            text += f"; the runner-up {escape(f.runner_up)} ({fmt(f.runner_up_score)}) cannot be told apart from it"
        elif f.apart:
            text += f"; clearly below the runner-up {escape(f.runner_up)} ({fmt(f.runner_up_score)})"
        items.append(f"<li>{text}.</li>")
    if items:
        out.append(f"<ul>{''.join(items)}</ul>")
    for table in page.tables:
        head = [("layer", "layer"), ("depth", "depth")]
        for p in table.perturbations:
            head += [(f"score:{p}", f"{p} score"), (f"critical:{p}", f"{p} p½")]
        rows = []
        for r in table.rows:
            cells = [_td(r.layer), _td(fmt(r.depth), r.depth)]
            for p in table.perturbations:
                c = r.cells[p]
                cells += [
                    _score(c.score, c.verdict if c.verdict in ("critical", "undetermined") else ""),
                    _td(
                        critical_text(c.critical.value, c.critical.low, c.critical.high, c.max_level, c.axis),
                        c.critical.value,
                    ),
                ]
            rows.append(cells)
        out.append(_table(head, rows))
    out += [_figure(link.path, link.label) for link in page.plots]
    out.append("</section>")
    return "\n".join(out)


@dataclass(frozen=True)
class HtmlReporter:
    name: str = "html"
    description: str = "HTML: one static page, sortable tables, the figures beside it, no external resources"
    suffix: str = ".html"

    def render(self, board: Leaderboard, single: bool = False) -> dict[str, str]:
        b = board.bootstrap
        intervals = INTERVALS.format(method=b.method, replicates=b.replicates, seed=b.seed) if b else NO_INTERVALS
        body = [
            f"<h1>{escape(board.title)}</h1>",
            "<p>Rendered by lesionbench from the result files listed under Sources; do not edit by hand.</p>",
        ]
        for track in board.tracks:
            body += _track(track)
        body += ["<h2>How to read these tables</h2>", f"<p>{_inline(HOW_TO_READ)}</p>", f"<p>{_inline(intervals)}</p>"]
        if board.sources:
            body.append("<p>Sources: " + ", ".join(f"<code>{escape(s)}</code>" for s in board.sources) + "</p>")
        page = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="lesionbench ({board.schema})">',
            f"<title>{escape(board.title)}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            *body,
            f"<script>{SCRIPT}</script>",
            "</body>",
            "</html>",
        ]
        return {MAIN: "\n".join(page) + "\n"}


@hookimpl
def lesionbench_reporters():
    return [HtmlReporter()]
