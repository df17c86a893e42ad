"""Executors: where a plan's blocks are evaluated, behind one small interface; a plugin kind.

An executor prepares the plan it will run (every check, before anything is written), then opens a
session (connecting to a cluster, checking its workers) that yields a function evaluating every
cell not already in a store, appending rows and ticking progress once per cell. Executors are
contributed through the ``lesionbench_executors`` hook (kind ``executors``): the built-in
``local`` (:mod:`lesionbench.executors.local`, in this process) and ``ray``
(:mod:`lesionbench.executors.ray`, one task per block on a Ray cluster) are plugins like any
other, and both drive the same loop (:func:`lesionbench.executors.driver.drive`: resume, progress
and row writing written once), so they write the same rows.

This module imports nothing heavy: ``lesionbench list executors`` and ``--help`` stay fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lesionbench.errors import LesionbenchError

if TYPE_CHECKING:
    from lesionbench.plan import Plan
    from lesionbench.registry import Registry
    from lesionbench.store import Store
    from lesionbench.study import Study

Tick = Callable[[str], None]
Execute = Callable[["Store", Tick, bool], None]  # (store, tick, debug) -> None

DEFAULT_EXECUTOR = "local"


class Executor(Protocol):
    name: str

    def prepare(self, study: Study, registry: Registry) -> Plan:
        """The plan as the driver holds it; raises LesionbenchError on bad input, writing nothing."""

    def session(self, plan: Plan, registry: Registry) -> AbstractContextManager[Execute]:
        """Connect (and check the workers); yield ``execute(store, tick, debug)``."""


@dataclass(frozen=True)
class ExecutorPlugin:
    """What a plugin contributes to the ``executors`` kind.

    ``name``: what ``--executor`` takes; ``description``: one line for ``lesionbench list executors``;
    ``factory(**options)``: the :class:`Executor`, built when a run starts; ``options``: the
    options it accepts, name → one-line help (``--executor-option KEY=VALUE`` on the command line,
    ``executor_options={KEY: VALUE}`` in :func:`lesionbench.api.run_study`). Option values arrive
    as strings from the command line, as given from Python.
    """

    name: str
    description: str
    factory: Callable[..., Executor]
    options: Mapping[str, str] = field(default_factory=dict)

    def create(self, **options: Any) -> Executor:
        return self.factory(**options)


def create_executor(name: str, options: Mapping[str, Any] | None = None, registry: Registry | None = None) -> Executor:
    """The single door to an executor: ``name`` looked up in the registry's ``executors``.

    Raises:
        LesionbenchError: an unknown executor (the registered ones listed), or an option the
            executor does not take (naming the executors that do take it).
    """
    from lesionbench.registry import get_registry

    registry = registry or get_registry()
    plugin = registry.get("executors", name)
    options = {k: v for k, v in dict(options or {}).items() if v is not None}
    for key in options:
        if key not in plugin.options:
            others = sorted(n for n, c in registry.contributions("executors").items() if key in c.obj.options)
            where = f"; it is an option of {', '.join(f'--executor {o}' for o in others)}" if others else ""
            takes = ", ".join(sorted(plugin.options)) or "none"
            raise LesionbenchError(f"executor {name!r} takes no option {key!r} (its options: {takes}){where}")
    return plugin.create(**options)


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """``--executor-option KEY=VALUE`` pairs as a mapping (one-line error for a pair without ``=``)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LesionbenchError(f"--executor-option takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


__all__ = ["DEFAULT_EXECUTOR", "Execute", "Executor", "ExecutorPlugin", "Tick", "create_executor", "parse_options"]
