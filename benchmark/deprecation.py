"""Deprecating a public name, option or behaviour: one warning class and one message format.

The policy (docs/how-to/contributing.md): anything on the public surface (``lesionbench.__all__``,
the hooks, the command line, study options, the results schema) that is to be removed is first
deprecated for at least one minor release. While deprecated it keeps working and warns with
:class:`LesionbenchDeprecationWarning`; the warning names the release that deprecated it, the
release that will remove it, and what to use instead. Each deprecation gets a CHANGELOG entry under
"Deprecated", and its removal one under "Removed".

Usage::

    from lesionbench.deprecation import deprecated, warn_deprecated

    @deprecated(since="0.3.0", removed_in="0.5.0", use="lesionbench.load_results")
    def read_results(path): ...

    if "old_key" in options:  # an option or argument rather than a whole function
        warn_deprecated("study option 'old_key'", since="0.3.0", removed_in="0.5.0", use="'new_key'")

The warning is a :class:`FutureWarning` (Python's category for deprecations meant for the end users
of an application, shown by default) rather than a :class:`DeprecationWarning` (hidden by default
outside ``__main__``): lesionbench is used through its command line and study files as much as
through its API, and a deprecation nobody sees cannot be acted on. Make it an error in a test
suite with pytest's ``filterwarnings = ["error::lesionbench.deprecation.LesionbenchDeprecationWarning"]``
or ``warnings.simplefilter("error", LesionbenchDeprecationWarning)``; on the command line,
``python -W error::FutureWarning`` (``-W`` cannot name a class of a module not yet imported).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import TypeVar

__all__ = ["LesionbenchDeprecationWarning", "deprecated", "deprecation_message", "warn_deprecated"]

T = TypeVar("T", bound=Callable)


class LesionbenchDeprecationWarning(FutureWarning):
    """A public name, option or behaviour of lesionbench that still works but will be removed."""


def deprecation_message(what: str, since: str, removed_in: str, use: str | None = None) -> str:
    """The one-line message: ``"<what> is deprecated since lesionbench <since> and will be removed in
    <removed_in>; use <use> instead"`` (the last clause only with ``use``).

    Raises :class:`ValueError` when ``since`` or ``removed_in`` is not a release number
    (``MAJOR.MINOR[.PATCH]``) or ``removed_in`` is not a later release than ``since``.
    """
    if _release(removed_in) <= _release(since):
        raise ValueError(f"removed_in {removed_in!r} must be a later release than since {since!r}")
    text = f"{what} is deprecated since lesionbench {since} and will be removed in {removed_in}"
    return f"{text}; use {use} instead" if use else text


def warn_deprecated(what: str, since: str, removed_in: str, use: str | None = None, stacklevel: int = 2) -> None:
    """Warn that ``what`` (a name, option or behaviour, as the user would write it) is deprecated.

    ``stacklevel`` counts as for :func:`warnings.warn` from the caller of this function: the default
    2 points the warning at whoever called the function that calls ``warn_deprecated``. Emits
    :class:`LesionbenchDeprecationWarning` with :func:`deprecation_message`'s text.
    """
    warnings.warn(deprecation_message(what, since, removed_in, use), LesionbenchDeprecationWarning, stacklevel + 1)


def deprecated(since: str, removed_in: str, use: str | None = None) -> Callable[[T], T]:
    """A decorator for a deprecated function or class: calling it (or instantiating the class) warns
    (:func:`warn_deprecated`, pointing at the caller) and then behaves exactly as before.

    The wrapped object keeps its name, signature and docstring (:func:`functools.wraps`); a
    ``.. deprecated::`` note is appended to the docstring, so the API reference shows it. For a class
    the warning comes from ``__init__`` (so a subclass's instances warn too) and ``isinstance``
    keeps working.
    """
    deprecation_message("check", since, removed_in)  # a bad release number fails where it is declared

    def decorate(obj: T) -> T:
        what = f"{obj.__module__}.{obj.__qualname__}"
        note = f"\n\n.. deprecated:: {since}\n   Will be removed in {removed_in}" + (
            f"; use {use} instead." if use else "."
        )
        if inspect.isclass(obj):
            init = obj.__init__

            @functools.wraps(init)
            def __init__(self, *args, **kwargs):
                warn_deprecated(what, since, removed_in, use)  # subclasses too: they build on the deprecated class
                init(self, *args, **kwargs)

            obj.__init__ = __init__
            obj.__doc__ = (inspect.cleandoc(obj.__doc__ or "") + note).strip()
            return obj

        @functools.wraps(obj)
        def wrapper(*args, **kwargs):
            warn_deprecated(what, since, removed_in, use)
            return obj(*args, **kwargs)

        wrapper.__doc__ = (inspect.cleandoc(obj.__doc__ or "") + note).strip()
        return wrapper  # type: ignore[return-value]

    return decorate


def _release(version: str) -> tuple[int, ...]:
    parts = version.split(".")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{version!r} is not a release number (MAJOR.MINOR or MAJOR.MINOR.PATCH)")
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts))
