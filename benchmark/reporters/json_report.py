"""The JSON reporter (``--format json``): the machine-readable leaderboard others can consume.

One document, ``{"schema": "lesionbench.leaderboard/1", "title": …, "tracks": […]}``: the fields of
:class:`lesionbench.board.Leaderboard`, missing numbers as ``null`` and a critical level that was
never reached as ``"inf"`` (``"-inf"``). The JSON Schema ships beside this module
(:data:`SCHEMA_FILE`); :func:`load` reads a document back into the same data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lesionbench.board import Leaderboard, from_dict, to_dict
from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl
from lesionbench.reporters import MAIN

SCHEMA_FILE = Path(__file__).with_name("leaderboard.schema.json")


def dumps(board: Leaderboard) -> str:
    """``board`` as JSON text (UTF-8, indented, keys in field order, one trailing newline)."""
    return json.dumps(to_dict(board), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def loads(text: str) -> Leaderboard:
    """The leaderboard of a JSON document :func:`dumps` wrote; LesionbenchError for anything else."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LesionbenchError(f"not a JSON leaderboard: {exc}") from None
    return from_dict(data)


def load(path: Path | str) -> Leaderboard:
    """:func:`loads` of a file; LesionbenchError for one that cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LesionbenchError(f"cannot read the leaderboard {str(path)!r}: {exc}") from None
    return loads(text)


def schema() -> dict:
    """The JSON Schema (draft 2020-12) of the documents :func:`dumps` writes."""
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class JsonReporter:
    name: str = "json"
    description: str = "JSON, schema lesionbench.leaderboard/1: the leaderboard as data for other tools"
    suffix: str = ".json"

    def render(self, board: Leaderboard, single: bool = False) -> dict[str, str]:
        return {MAIN: dumps(board)}


@hookimpl
def lesionbench_reporters():
    return [JsonReporter()]
