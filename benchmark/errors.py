"""Errors the command line turns into one clear line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LesionbenchError(Exception):
    """Bad input or an unusable plugin: the message is meant for the user as it stands."""


class PluginError(LesionbenchError):
    """A plugin clashed with another or failed to load."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> LesionbenchError:
    """An error for an unknown name that lists the valid ones and the closest match."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(valid) if valid else "(none loaded)"
    return LesionbenchError(f"unknown {kind} {name!r}.{hint} Valid: {listing}")
