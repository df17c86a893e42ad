"""The built-in ``local`` executor: every block in this process, model by model, layer by layer in
forward order. A plugin like any other (``lesionbench_executors``); the loop is the shared driver's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from lesionbench.executors import ExecutorPlugin
from lesionbench.hookspecs import hookimpl

if TYPE_CHECKING:
    from lesionbench.executors.driver import Finished, Job
    from lesionbench.plan import Plan
    from lesionbench.registry import Registry
    from lesionbench.store import Store
    from lesionbench.study import Study


def evaluate_here(plan: Plan, jobs: Sequence[Job], debug: bool, note: Callable[[str], None]) -> Iterator[Finished]:
    """The local backend: one :class:`~lesionbench.cells.ModelRunner` per model, its jobs in order.

    A model's own code failing outside a cell (its clean pass…) stops the run with one line naming
    its plugin (a failing cell is recorded in its row instead)."""
    from itertools import groupby

    from lesionbench.cells import ModelRunner, eval_sets
    from lesionbench.data import EvalSetCache
    from lesionbench.executors.driver import Finished

    cache = EvalSetCache()
    for name, group in groupby(jobs, key=lambda j: j.model):
        group = list(group)
        prepared = plan.model(name)

        with _blamed_on(prepared, name, note):  # the model's own code failed in its clean pass
            runner = ModelRunner(plan, prepared, *eval_sets(plan, cache, prepared), debug=debug, note=note)

        def guarded(
            rows, prepared=prepared, name=name
        ):  # the runner's work, however (and whenever) the driver pulls it
            with _blamed_on(prepared, name, note):
                yield from rows

        try:
            for i, job in enumerate(group):
                rows = () if job.block is None else guarded(runner.block_rows(job.block, job.done))
                yield Finished(job, runner.clean_row, rows, runner.notes if i == len(group) - 1 else list)
        finally:  # cached activations (and spilled files) go, however the run ends
            runner.close()


@contextmanager
def _blamed_on(prepared, name: str, note: Callable[[str], None]) -> Iterator[None]:
    """A model's own code failing outside a cell: one line naming its plugin, the traceback to the run log."""
    from lesionbench.errors import LesionbenchError, plugin_failure

    try:
        yield
    except (LesionbenchError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise plugin_failure(prepared.plugin, f"evaluating model {name!r}", exc, note) from None


def execute(plan: Plan, store: Store, tick=None, debug: bool = False) -> None:
    """Evaluate every cell of ``plan`` not already in ``store`` here, appending a row per cell."""
    from lesionbench.executors.driver import drive

    drive(plan, store, tick, debug, evaluate_here)


class LocalExecutor:
    name = "local"

    def prepare(self, study: Study, registry: Registry) -> Plan:
        from lesionbench.plan import prepare

        return prepare(study, registry)

    @contextmanager
    def session(self, plan: Plan, registry: Registry) -> Iterator:
        yield lambda store, tick, debug: execute(plan, store, tick, debug)


@hookimpl
def lesionbench_executors():
    return [
        ExecutorPlugin("local", "Evaluate every block in this process, model by model (the default).", LocalExecutor)
    ]
