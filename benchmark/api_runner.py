"""A study from its checks to its stored rows: what ``lesionbench run`` and :func:`lesionbench.run` share.

:func:`run_study` prepares the plan (every check), creates or reopens the store (in memory, a new run
directory, or an earlier one to resume or redo) and hands it to the chosen executor;
:func:`lesionbench.api` re-exports it with the helpers the command line also uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from lesionbench import __version__
from lesionbench.errors import LesionbenchError
from lesionbench.executors import DEFAULT_EXECUTOR, Tick, create_executor
from lesionbench.plan import Plan
from lesionbench.registry import Registry
from lesionbench.schema import check_plan
from lesionbench.store import MemoryStore, RunDir, Store, Subset
from lesionbench.study import Study

ProgressFactory = Callable[[int], AbstractContextManager[Tick]]


def plugin_versions(registry: Registry) -> dict[str, dict[str, str]]:
    """Each loaded plugin's module, distribution and version: what a manifest records."""
    out = {}
    for name in registry.plugin_names():
        info = registry.info(name)
        out[name] = {"module": info.module, "distribution": info.distribution, "version": info.version}
    return out


def run_study(
    study: Study,
    registry: Registry,
    out: Path | None = None,
    resume: bool = False,
    progress: ProgressFactory | None = None,
    debug: bool = False,
    executor: str = DEFAULT_EXECUTOR,
    executor_options: Mapping[str, Any] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    redo: Sequence[str] = (),
) -> Store:
    """Prepare (every check), then create or reopen the store, then execute; returns the store.

    ``out`` None keeps the rows in memory. ``resume`` finishes an earlier run in ``out`` (a
    directory made by another study is refused before anything runs). ``executor``: a registered
    executor's name (``lesionbench list executors``), ``executor_options`` the options it takes
    (``executor="ray", executor_options={"address": "auto"}`` joins this node's Ray cluster). ``redo`` (with ``resume``)
    names perturbations of the study whose cells are dropped and evaluated again
    (:meth:`RunDir.forget`); a name not in the study raises LesionbenchError. A run directory's lock
    is released at the end.
    """
    chosen = create_executor(executor, executor_options, registry)
    plan = chosen.prepare(study, registry)
    if on_plan is not None:
        on_plan(plan)
    store: Store
    subset = subset_of(plan)
    if out is None:
        store = MemoryStore(subset=subset)
    elif resume:
        store = RunDir.open_existing(out, plan.fingerprint(), subset)  # a different study is refused before connecting
        store.note(f"run resumed: lesionbench {__version__}, study {plan.study.name!r}")
        try:
            if redo:
                unknown = [p for p in redo if p not in plan.perturbations]
                if unknown:
                    raise LesionbenchError(
                        f"--redo {', '.join(unknown)}: not a perturbation of the study in "
                        f"{str(out)!r} (its perturbations: {', '.join(plan.perturbations)})"
                    )
                store.forget(list(redo))
            check_plan(store.frame(), plan, store.results_path)  # every row a cell of this study's plan
        except BaseException:
            store.close()
            raise
        if all_done(plan, store):
            store.already_complete = True
            store.close()
            return store
    else:
        store = None  # created once the session is up: a cluster that cannot be reached leaves nothing behind
    try:
        with chosen.session(plan, registry) as execute:
            if store is None:
                store = RunDir.create(out, study.to_dict(), plan.fingerprint(), plugin_versions(registry), subset)
            with (progress or (lambda _total: nullcontext(lambda _d: None)))(plan.total()) as tick:
                execute(store, tick, debug)
    finally:
        if isinstance(store, RunDir):
            store.close()
    return store


def subset_of(plan: Plan) -> Subset:
    """The plan's evaluation subset as the store records it beside the per-image outcomes."""
    return Subset(
        plan.study.dataset.name,
        plan.study.dataset.split,
        np.asarray(plan.indices, np.int64),
        np.asarray(plan.raw.labels[plan.indices], np.int64),
        plan.raw.tokens,
    )


def all_done(plan: Plan, store: Store) -> bool:
    """Whether ``store`` holds every cell of ``plan``, adaptive draws included (a resumed run with nothing left to do)."""
    done = store.completed()
    return all(
        plan.key(m.loaded.name) in done and all(plan.settled(m, b, done) for b in plan.blocks(m)) for m in plan.models
    )
