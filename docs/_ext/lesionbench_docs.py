"""Sphinx directives that generate reference pages from the code's own declarations.

``study-options``: one table row per study-file option, read from the ``option(...)`` declarations of
:class:`lesionbench.study.Study` and :class:`lesionbench.study.DatasetSpec` (key, type, default, command
line flag, whether it changes the numbers, help) — so the page cannot miss or misstate an option.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def _type_text(hint) -> str:
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    text = text or str(hint).replace("typing.", "").replace("lesionbench.model_sources.", "")
    return text.replace("NoneType", "None")


def _default_text(f) -> str:
    value = f.default if f.default is not MISSING else f.default_factory()
    if hasattr(value, "__dataclass_fields__"):
        return "(the [dataset] table)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "(none)"
    if isinstance(value, tuple):
        value = list(value)
    return repr(value).replace("'", '"')


def option_rows(cls, prefix: str = "") -> list[tuple[str, ...]]:
    """(key, type, default, flag, changes the numbers, meaning) of each option of ``cls``, as plain text."""
    from lesionbench.study import option_fields

    hints = typing.get_type_hints(cls)
    rows = []
    for f in option_fields(cls):
        meta = f.metadata
        numbers = {True: "yes", False: "no", "when_on": "when not the default"}[meta["numbers"]]
        flag = f"--{f.name.replace('_', '-')}" if meta["flag"] else ""
        text = meta["help"]
        if meta.get("choices"):
            text += " (one of " + ", ".join(meta["choices"]) + ")"
        if meta.get("minimum") is not None:
            text += f" (at least {meta['minimum']:g})"
        rows.append((prefix + f.name, _type_text(hints[f.name]), _default_text(f), flag, numbers, text))
    return rows


HEADER = ("key", "type", "default", "flag", "changes the numbers", "meaning")
CODE_COLUMNS = {0, 1, 2, 3}  # shown as literals


class StudyOptions(SphinxDirective):
    """``{study-options}`` (``{study-options} dataset`` for the [dataset] table): the generated table."""

    has_content = False
    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        from lesionbench.study import DatasetSpec, Study

        cls, prefix = (DatasetSpec, "dataset.") if self.arguments and self.arguments[0] == "dataset" else (Study, "")
        table = nodes.table(classes=["study-options"])
        group = nodes.tgroup(cols=len(HEADER))
        table += group
        for width in (14, 12, 12, 12, 10, 40):
            group += nodes.colspec(colwidth=width)
        head, body = nodes.thead(), nodes.tbody()
        group += head
        group += body
        head += self._row(HEADER, header=True)
        for row in option_rows(cls, prefix):
            body += self._row(row)
        return [table]

    @staticmethod
    def _row(cells, header: bool = False) -> nodes.row:
        row = nodes.row()
        for i, text in enumerate(cells):
            entry = nodes.entry()
            inline = nodes.literal(text, text) if text and i in CODE_COLUMNS and not header else nodes.Text(text)
            entry += nodes.paragraph("", "", inline)
            row += entry
        return row


BOARD = "results/board"  # where the leaderboard is copied, under the docs source (ignored by git)


def copy_leaderboard(app) -> None:
    """Copy the generated leaderboard (Markdown, per-model pages, figures) into the docs source, so its
    relative links and images resolve as on GitHub; per-model pages are marked orphan (the leaderboard
    links them, no toctree lists them)."""
    import shutil
    from pathlib import Path

    source = Path(app.config.lesionbench_leaderboard)
    target = Path(app.srcdir) / BOARD
    shutil.rmtree(target, ignore_errors=True)
    if not (source / "LEADERBOARD.md").is_file():
        return
    shutil.copytree(
        source, target, ignore=shutil.ignore_patterns("results", "in-progress", "*.csv", "*.arrow", "*.json")
    )
    for page in target.rglob("*.md"):
        if page.name != "LEADERBOARD.md":
            page.write_text("---\norphan: true\n---\n\n" + page.read_text())


def setup(app):
    app.add_directive("study-options", StudyOptions)
    app.add_config_value("lesionbench_leaderboard", "", "env")
    app.connect("builder-inited", copy_leaderboard)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
