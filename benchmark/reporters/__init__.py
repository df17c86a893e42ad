"""Reporters: what turns the leaderboard's data (:class:`lesionbench.board.Leaderboard`) into
documents — a plugin kind, like models and perturbations.

The built-ins ``md``, ``json`` and ``html`` are registered from the built-in plugin list
(:data:`lesionbench.registry.BUILTIN_PLUGINS`); a third party adds one with the
``lesionbench_reporters`` hook in a module named under the ``lesionbench`` entry-point group, and
``lesionbench leaderboard RESULTS --format NAME`` selects it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lesionbench.board import Leaderboard

MAIN = ""  # the key of the main document (the file given as --out) in what a reporter returns


@runtime_checkable
class Reporter(Protocol):
    """The contract of a reporter.

    ``name`` is what ``--format`` takes, ``description`` one line for ``lesionbench list
    reporters``, ``suffix`` the main document's file suffix (``".md"``: the default ``--out`` is
    ``leaderboard/LEADERBOARD<suffix>``). ``render(board, single)`` returns the documents as text by
    path relative to the main one, the main document under :data:`MAIN` (``""``); with ``single``
    everything goes into the main document (a reporter that writes one document ignores it).
    Figure paths in the data are relative to the main document. ``render`` must not write files:
    the caller writes each document atomically."""

    name: str
    description: str
    suffix: str

    def render(self, board: Leaderboard, single: bool = False) -> Mapping[str, str]: ...


def contract_problem(obj: object) -> str:
    """A reporter's rule beyond its fields' types: ``suffix`` is a file suffix such as ``".md"``."""
    suffix = getattr(obj, "suffix", "")
    return (
        ""
        if suffix.startswith(".") and len(suffix) > 1
        else f"field 'suffix' must be a file suffix such as '.md', got {suffix!r}"
    )
