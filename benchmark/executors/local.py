"""The local executor: every block in this process, model by model, layer by layer in forward order."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lesionbench.cells import ModelRunner, eval_sets
from lesionbench.data import EvalSetCache
from lesionbench.errors import LesionbenchError, plugin_failure
from lesionbench.plan import Plan, prepare
from lesionbench.registry import Registry
from lesionbench.store import Store
from lesionbench.study import Study


def execute(plan: Plan, store: Store, tick=None, debug: bool = False) -> None:
    """Evaluate every cell of ``plan`` not already in ``store``, appending a row per cell."""
    done = store.completed()
    cache = EvalSetCache()
    tick = tick or (lambda _desc: None)
    for prepared in plan.models:
        name = prepared.loaded.name
        clean_key = plan.key(name)
        cells = plan.cells(prepared)
        if clean_key in done and all(plan.settled(prepared, b, done) for b in plan.blocks(prepared)):
            for _ in range(len(cells) + 1):
                tick(f"{name}: done earlier")
            continue
        for note in prepared.notes:
            store.note(note)
        try:
            _execute_model(plan, prepared, store, tick, debug, done, cache)
        except (LesionbenchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the model's own code failed outside a cell (its clean pass…)
            raise plugin_failure(prepared.plugin, f"evaluating model {name!r}", exc, store.note) from None


def _execute_model(plan: Plan, prepared, store: Store, tick, debug: bool, done: set, cache: EvalSetCache) -> None:
    name = prepared.loaded.name
    runner = ModelRunner(plan, prepared, *eval_sets(plan, cache, prepared), debug=debug, note=store.note)
    try:
        if plan.key(name) not in done:
            store.append(runner.clean_row())
        tick(f"{name}: clean")
        for block in plan.blocks(prepared):
            for row, label in runner.block_rows(block, done):
                if row is not None:
                    store.append(row)
                tick(label)
        for note in runner.notes():
            store.note(note)
    finally:  # cached activations (and spilled files) go, however the run ends
        runner.close()


class LocalExecutor:
    name = "local"

    def prepare(self, study: Study, registry: Registry) -> Plan:
        return prepare(study, registry)

    @contextmanager
    def session(self, plan: Plan, registry: Registry) -> Iterator:
        yield lambda store, tick, debug: execute(plan, store, tick, debug)
