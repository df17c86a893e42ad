"""Executors: where a plan's blocks are evaluated, behind one small interface.

An executor prepares the plan it will run (every check, before anything is written), then opens a
session (connecting to a cluster, checking its workers) that yields a function evaluating every
cell not already in a store, appending rows and ticking progress once per cell. ``local`` runs
in this process; ``ray`` runs one task per block on a Ray cluster. Both write the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from lesionbench.errors import LesionbenchError
from lesionbench.plan import Plan
from lesionbench.registry import Registry
from lesionbench.store import Store
from lesionbench.study import Study

Tick = Callable[[str], None]
Execute = Callable[[Store, Tick, bool], None]  # (store, tick, debug) -> None

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    name: str

    def prepare(self, study: Study, registry: Registry) -> Plan:
        """The plan as the driver holds it; raises LesionbenchError on bad input, writing nothing."""

    def session(self, plan: Plan, registry: Registry) -> AbstractContextManager[Execute]:
        """Connect (and check the workers); yield ``execute(store, tick, debug)``."""


def create_executor(name: str, address: str | None = None) -> Executor:
    """The single door to an executor by name; ``address`` is a Ray cluster's (``auto``, ``ray://…``)."""
    if name == "local":
        if address is not None:
            raise LesionbenchError("--ray-address is for --executor ray")
        from lesionbench.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from lesionbench.executors.ray import RayExecutor

        return RayExecutor(address)
    raise LesionbenchError(f"unknown executor {name!r} (local or ray)")


__all__ = ["EXECUTORS", "Execute", "Executor", "Tick", "create_executor"]
