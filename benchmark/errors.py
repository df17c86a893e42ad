"""Errors the command line turns into one clear line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


class LesionbenchError(Exception):
    """Bad input or an unusable plugin: the message is meant for the user as it stands."""


class PluginError(LesionbenchError):
    """A plugin clashed with another or failed to load."""


def plugin_failure(
    plugin: str, what: str, exc: BaseException, log_to: Callable[[str], None] | None = None
) -> PluginError:
    """One line for a plugin's own bug, naming the plugin; the traceback goes to ``log_to`` (the
    run's log) or, before a run directory exists, to a file in the temporary directory."""

    where = _keep_traceback(f"plugin {plugin!r} failed while {what}", exc, log_to)
    return PluginError(f"plugin {plugin!r} failed while {what}: {_first_line(exc)} (traceback in {where})")


def internal_failure(what: str, exc: BaseException) -> LesionbenchError:
    """One line for lesionbench's own bug (not a plugin's): the model ran, lesionbench's code failed."""
    where = _keep_traceback(f"lesionbench failed while {what}", exc, None)
    return LesionbenchError(
        f"lesionbench failed while {what}: {_first_line(exc)}; this is a bug in lesionbench, "
        f"not in the model or its plugin: please report it with the traceback in {where}"
    )


def _first_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def _keep_traceback(title: str, exc: BaseException, log_to: Callable[[str], None] | None) -> str:
    """Write ``exc``'s traceback to ``log_to`` (the run's log) or a temporary file; returns where."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(exc))
    if log_to is not None:
        log_to(f"{title}:\n{text}")
        return "run.log"
    with tempfile.NamedTemporaryFile("w", prefix="lesionbench-traceback-", suffix=".log", delete=False) as f:
        f.write(text)
    return f.name


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> LesionbenchError:
    """An error for an unknown name that lists the valid ones and the closest match."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(valid) if valid else "(none loaded)"
    return LesionbenchError(f"unknown {kind} {name!r}.{hint} Valid: {listing}")


@contextmanager
def blame(plugin: str, what: str) -> Iterator[None]:
    """Turn an exception from a plugin's own code into one line naming the plugin (traceback kept)."""
    try:
        yield
    except (LesionbenchError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported as such
        raise plugin_failure(plugin, what, exc) from None
