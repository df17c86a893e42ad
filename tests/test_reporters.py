"""Reporters: the leaderboard's data rendered as Markdown (the committed files, byte for byte), JSON
(schema-versioned, round trip) and HTML (loaded in headless Chromium); a plugin's own reporter
chosen with ``--format``."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest

import lesionbench.registry as registry_mod
from lesionbench.board import SCHEMA, Leaderboard, json_schema
from lesionbench.cli import main
from lesionbench.errors import LesionbenchError
from lesionbench.publish import collect, write_documents
from lesionbench.registry import get_registry
from lesionbench.reporters import MAIN
from lesionbench.reporters.json_report import SCHEMA_FILE, dumps, load, loads

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "leaderboard"
TITLE = "lesionbench leaderboard"


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> tuple[Path, Leaderboard]:
    """The committed results copied to a folder of their own, and their leaderboard's data (built once)."""
    if not (COMMITTED / "results").is_dir():
        pytest.skip("no committed results in this checkout")
    root = tmp_path_factory.mktemp("board")
    shutil.copytree(COMMITTED / "results", root / "results")
    return root, collect([root / "results"], root, draw=False, title=TITLE)


def render(board: Leaderboard, name: str) -> dict[str, str]:
    return dict(get_registry().get("reporters", name).render(board))


# ---------------------------------------------------------------- Markdown


def test_markdown_reproduces_the_committed_leaderboard_and_model_pages_byte_for_byte(committed):
    root, board = committed
    written = write_documents(render(board, "md"), root / "LEADERBOARD.md", ".md")
    assert written.read_text() == (COMMITTED / "LEADERBOARD.md").read_text()
    pages = sorted(p.name for p in (root / "models").glob("*.md"))
    assert pages == sorted(p.name for p in (COMMITTED / "models").glob("*.md")) and pages
    for name in pages:
        assert (root / "models" / name).read_text() == (COMMITTED / "models" / name).read_text(), name


# ---------------------------------------------------------------- JSON


def test_json_is_schema_versioned_valid_against_the_shipped_schema_and_round_trips(committed):
    import jsonschema

    _root, board = committed
    text = render(board, "json")[MAIN]
    document = json.loads(text)  # strict JSON: no NaN or Infinity tokens
    assert document["schema"] == SCHEMA == "lesionbench.leaderboard/1"
    shipped = json.loads(SCHEMA_FILE.read_text())
    assert shipped == json_schema(), "leaderboard.schema.json is out of date with lesionbench.board"
    jsonschema.Draft202012Validator.check_schema(shipped)
    jsonschema.Draft202012Validator(shipped).validate(document)
    assert loads(text) == board
    assert dumps(loads(text)) == text
    # a critical level never reached is written as "inf" and read back as infinity
    cells = [c for t in board.tracks for m in t.models for tab in m.tables for r in tab.rows for c in r.cells.values()]
    assert any(math.isinf(c.critical.value) for c in cells)
    assert '"value": "inf"' in text


def test_json_reader_refuses_another_schema_and_a_malformed_document(tmp_path):
    with pytest.raises(LesionbenchError, match="lesionbench.leaderboard/1"):
        loads(json.dumps({"schema": "lesionbench.leaderboard/0", "title": "t"}))
    with pytest.raises(LesionbenchError, match="malformed"):
        loads(json.dumps({"schema": SCHEMA, "title": "t", "sources": [], "bootstrap": None, "tracks": [{}]}))
    with pytest.raises(LesionbenchError, match="not a JSON leaderboard"):
        loads("{")
    with pytest.raises(LesionbenchError, match="cannot read"):
        load(tmp_path / "missing.json")


def test_a_board_without_intervals_or_scores_round_trips_too():
    """No outcomes (no intervals: nulls), a model at chance (unscored), two tracks, no ranked perturbation on one."""
    import pandas as pd

    from lesionbench.leaderboard import build_leaderboard
    from test_leaderboard import results

    a, b = results("a", "d1"), results("b", "d1", clean=0.1)  # b at chance on 100 images of 10 classes
    c, d = results("c", "d2", perts=("p",)), results("d", "d2", perts=("q",))  # nothing shared on d2
    board = build_leaderboard(pd.concat([a, b, c, d], ignore_index=True))
    assert [len(t.unscored) for t in board.tracks] == [1, 0] and board.tracks[1].ranked == []
    assert board.bootstrap is None and board.tracks[0].entries[0].overall.low is None
    text = dumps(board)
    assert loads(text) == board and '"low": null' in text and '"rank": null' in text


def test_a_reporter_that_breaks_the_contract_is_left_out_and_named_with_its_plugin():
    from lesionbench import hookimpl
    from lesionbench.registry import create_registry

    class NoDot:
        name, description, suffix = "nodot", "a reporter whose suffix has no dot", "csv"

        def render(self, board, single=False):
            return {"": ""}

    class Plugin:
        @hookimpl
        def lesionbench_reporters(self):
            return [NoDot()]

    registry = create_registry([("nodot_plugin", Plugin())], entry_points=False, builtins=False)
    assert "nodot" not in registry.contributions("reporters")  # left out: a broken plugin hurts only itself
    failures = {f.plugin: f.message for f in registry.failures}
    assert "suffix" in failures["nodot_plugin"] and "nodot" in failures["nodot_plugin"]


# ---------------------------------------------------------------- HTML in a real browser


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing in CI: `make data` installs it (apt-get install -y chromium)")
    pytest.skip("no Chromium on this machine (apt-get install -y chromium); CI installs it and runs this test")


def load_in_chromium(page: Path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and the console messages it logged."""
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


class Tables(HTMLParser):
    """Every table of a page: its class, the section it is in, header keys, rows of (data-value, text)."""

    def __init__(self):
        super().__init__()
        self.tables, self.sections, self.cell = [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("data-dataset") or a.get("id"))
        elif tag == "table":
            self.tables.append(
                {
                    "class": a.get("class", ""),
                    "ready": a.get("data-sortable"),
                    "sections": list(self.sections),
                    "head": [],
                    "rows": [],
                }
            )
        elif tag == "th":
            self.tables[-1]["head"].append(a.get("data-key"))
        elif tag == "tr" and self.tables and self.tables[-1]["head"]:
            self.tables[-1]["rows"].append([])
        elif tag == "td":
            self.cell = [a.get("data-value"), ""]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data

    def handle_endtag(self, tag):
        if tag == "section":
            self.sections.pop()
        elif tag == "td":
            self.tables[-1]["rows"][-1].append((self.cell[0], self.cell[1].strip()))
            self.cell = None


def parse(dom: str) -> list[dict]:
    parser = Tables()
    parser.feed(dom)
    return parser.tables


def shown(x: float | None, digits: int = 2) -> str:
    """How a number is printed with ``digits`` decimals (the oracle: Python's own rounding)."""
    return "–" if x is None else f"{x:.{digits}f}"


def check_score(cell: tuple[str | None, str], score: dict) -> None:
    value, text = cell
    assert float(value) == score["value"]
    numbers = re.findall(r"-?\d+\.\d+", text)
    expected = [shown(score["value"])] + (
        [shown(score["low"]), shown(score["high"])] if score["low"] is not None else []
    )
    assert numbers == expected, (text, score)


def test_html_loads_in_headless_chromium_without_console_errors_and_its_tables_hold_the_json_numbers(committed):
    """The first ranked table is clicked once (a script appended to the page): sorted by overall, ascending."""
    root, board = committed
    page = write_documents(render(board, "html"), root / "board.html", ".html")
    html = page.read_text()
    assert "<link" not in html and not re.search(r"""(src|href)=["']?(https?:)?//""", html), "an external resource"
    click = "<script>document.querySelector('table.ranked th[data-key=overall]').click();</script>"
    page.write_text(html.replace("</body>", click + "\n</body>"))
    data = json.loads(render(board, "json")[MAIN])
    dom, console = load_in_chromium(page)
    assert console == []
    tables = parse(dom)
    assert tables and all(t["ready"] == "ready" for t in tables), "the sorting script did not run on every table"
    ranked = [t for t in tables if "ranked" in t["class"]]
    column = ranked[0]["head"].index("overall")
    overall = [float(row[column][0]) for row in ranked[0]["rows"] if row[column][0] is not None]
    best_first = [e.overall.value for e in board.tracks[0].entries]
    assert len(overall) > 2 and overall == sorted(overall) and best_first != overall and sorted(best_first) == overall
    assert [t["sections"][0] for t in ranked] == [t["dataset"] for t in data["tracks"]]
    layer_cells = 0
    for t, track in zip(ranked, data["tracks"]):
        col = {key: i for i, key in enumerate(t["head"])}
        entries = {e["model"]: e for e in track["entries"]}
        assert len(t["rows"]) == len(entries) + len(track["unscored"])
        for row in t["rows"][: len(entries)]:
            e = entries[row[col["model"]][1]]
            assert row[col["rank"]][1] == (str(e["rank"]) if e["rank"] is not None else "–")
            assert row[col["clean_top1"]][1] == shown(e["clean_top1"], 3)
            check_score(row[col["overall"]], e["overall"])
            for p, score in e["perturbations"].items():
                check_score(row[col[f"perturbation:{p}"]], score)
        models = {m["page"]: m for m in track["models"]}
        seen: dict[str, int] = {}  # model page -> layer tables met so far
        for table in [x for x in tables if x["sections"][0] == track["dataset"] and len(x["sections"]) == 2]:
            page = table["sections"][1].removeprefix("model-")
            seen[page] = seen.get(page, -1) + 1
            cells = {r["layer"]: r["cells"] for r in models[page]["tables"][seen[page]]["rows"]}
            col = {key: i for i, key in enumerate(table["head"])}
            assert len(table["rows"]) == len(cells)
            for row in table["rows"]:
                for key, i in col.items():
                    if key.startswith("score:"):
                        check_score(row[i], cells[row[col["layer"]][1]][key.removeprefix("score:")]["score"])
                        layer_cells += 1
    assert layer_cells > 100


# ---------------------------------------------------------------- a reporter from a plugin

TOY = """
from dataclasses import dataclass

from lesionbench import hookimpl


@dataclass(frozen=True)
class RankCsv:
    name: str = "rankcsv"
    description: str = "the ranked models as CSV"
    suffix: str = ".csv"

    def render(self, board, single=False):
        lines = ["dataset,rank,model,overall"]
        for track in board.tracks:
            lines += [f"{track.dataset},{e.rank},{e.model},{e.overall.value:.6f}" for e in track.entries]
        return {"": "\\n".join(lines) + "\\n"}


@hookimpl
def lesionbench_reporters():
    return [RankCsv()]
"""


def test_a_reporter_from_a_plugin_is_listed_and_chosen_with_format(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    (site / "rankcsv_reporter-0.1.dist-info").mkdir(parents=True)
    (site / "rankcsv_reporter.py").write_text(textwrap.dedent(TOY))  # a name no other test imports
    (site / "rankcsv_reporter-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rankcsv-reporter\nVersion: 0.1\n"
    )
    (site / "rankcsv_reporter-0.1.dist-info" / "entry_points.txt").write_text(
        "[lesionbench]\nrankcsv = rankcsv_reporter\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry_mod, "_default", None)  # the CLI finds the entry point afresh
    monkeypatch.setattr(registry_mod, "_disabled", frozenset())  # whatever -p no:NAME an earlier test left
    try:
        assert main(["list", "reporters"]) == 0
        assert "rankcsv" in capsys.readouterr().out
        results = tmp_path / "results"
        shutil.copytree(COMMITTED / "results" / "int8-fashion", results)
        assert (
            main(["leaderboard", str(results), "--format", "rankcsv", "--no-plots", "--out", str(tmp_path / "b.csv")])
            == 0
        )
        assert (
            main(["leaderboard", str(results), "--format", "json", "--no-plots", "--out", str(tmp_path / "b.json")])
            == 0
        )
        assert main(["leaderboard", str(results), "--format", "nope", "--out", str(tmp_path / "c")]) == 2
        assert "unknown reporter 'nope'" in capsys.readouterr().err and not (tmp_path / "c").exists()
    finally:
        sys.modules.pop("rankcsv_reporter", None)
        registry_mod._default = None
    rows = (tmp_path / "b.csv").read_text().splitlines()
    board = load(tmp_path / "b.json")
    assert rows[0] == "dataset,rank,model,overall" and len(rows) == 1 + sum(len(t.entries) for t in board.tracks) > 1
    for row, entry in zip(rows[1:], [e for t in board.tracks for e in t.entries]):
        dataset, rank, model, overall = row.split(",")
        assert (model, int(rank)) == (entry.model, entry.rank) and float(overall) == pytest.approx(entry.overall.value)
