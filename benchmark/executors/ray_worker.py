"""What runs inside a Ray worker for the ``ray`` executor (:mod:`lesionbench.executors.ray`): the
study prepared once per worker process, its model runners kept between tasks, and the two tasks
(check a worker can prepare the study; evaluate one block).
"""

from __future__ import annotations

import importlib
import socket
from collections import OrderedDict

import torch

from lesionbench.cells import ModelRunner
from lesionbench.errors import LesionbenchError
from lesionbench.plan import Plan, prepare
from lesionbench.registry import get_registry
from lesionbench.study import parse_study

RUNNERS_PER_WORKER = 2  # model runners a worker keeps (the driver submits blocks model by model)


class WorkerState:
    """What a Ray worker process keeps between tasks: the study it prepared and its model runners.

    One per process (:data:`WORKER`): Ray reuses worker processes across tasks, and a task is a
    plain function, so this is where a worker remembers what it built.
    """

    def __init__(self) -> None:
        self.key: str | None = None  # the study prepared here (one study at a time)
        self.plan: Plan | None = None
        self.runners: OrderedDict[str, ModelRunner] = OrderedDict()  # model -> runner
        self.notes: dict[str, list[str]] = {}

    def plan_for(self, study_dict: dict, key: str, plugins: dict[str, str]) -> Plan:
        """The study prepared in this worker process, once; a plugin missing here is named."""
        if key == self.key and self.plan is not None:
            return self.plan
        for runner in self.runners.values():  # another study: let the last one's models go
            runner.close()
        self.__init__()
        registry = get_registry()
        try:
            plan = prepare(parse_study(study_dict), registry)
        except (LesionbenchError, ImportError) as exc:
            missing = _missing_plugins(registry, plugins)
            if missing:
                raise LesionbenchError(
                    f"Ray worker {socket.gethostname()} cannot load {missing}; the plugin packages must be "
                    f"installed on every worker (there: {str(exc).split('. ')[0]})"
                ) from None
            if isinstance(exc, ModuleNotFoundError):
                raise LesionbenchError(
                    f"Ray worker {socket.gethostname()} cannot import {exc.name!r}, which the study needs; it must be "
                    "installed on every worker"
                ) from None
            raise
        self.key, self.plan = key, plan
        return plan

    def runner(self, model: str, eval_ref: list, calibration_ref: list, debug: bool) -> ModelRunner:
        """The model's runner in this worker, built once (evaluation set fetched, not decoded)."""
        import ray

        if model in self.runners:
            self.runners.move_to_end(model)
            return self.runners[model]
        while len(self.runners) >= RUNNERS_PER_WORKER:
            _, old = self.runners.popitem(last=False)
            old.close()
        eval_set = ray.get(eval_ref[0])
        calibration = ray.get(calibration_ref[0]) if calibration_ref[0] is not None else None
        notes = self.notes.setdefault(model, [])
        runner = ModelRunner(self.plan, self.plan.model(model), eval_set, calibration, debug=debug, note=notes.append)
        self.runners[model] = runner
        return runner


WORKER = WorkerState()


def _missing_plugins(registry, plugins: dict[str, str]) -> str:
    """The driver's plugins that did not load here, each with the module it lacks."""
    here = set(registry.plugin_names())
    failures = {f.plugin: f.message for f in registry.failures if f.stage == "load"}
    out = []
    for name, module in sorted(plugins.items()):
        if name in here:
            continue
        why = failures.get(name)
        if why is None:
            try:
                importlib.import_module(module)
                why = "not registered here (its distribution's entry point is missing)"
            except ModuleNotFoundError as exc:
                why = f"No module named {exc.name!r}"
            except Exception as exc:  # noqa: BLE001 - reported, not handled
                why = f"{type(exc).__name__}: {exc}"
        out.append(f"plugin {name!r} (module {module!r}: {why})")
    return "; ".join(out)


def check_worker(study_dict: dict, key: str, plugins: dict[str, str], threads: int) -> bool:
    """A Ray task: prepare the study here (and keep it for the blocks that follow)."""
    torch.set_num_threads(threads)
    WORKER.plan_for(study_dict, key, plugins)
    return True


def run_block(
    study_dict: dict,
    key: str,
    plugins: dict[str, str],
    model: str,
    block,
    done: dict,
    eval_ref: list,
    calibration_ref: list,
    threads: int,
    debug: bool,
) -> dict:
    """A Ray task: the rows of one block not in ``done`` (``block`` None: only the clean row)."""
    torch.set_num_threads(threads)
    WORKER.plan_for(study_dict, key, plugins)
    runner = WORKER.runner(model, eval_ref, calibration_ref, debug)
    try:  # (row, label) per cell, row None for a cell done earlier: the driver ticks every label
        rows = [] if block is None else list(runner.block_rows(block, done))
    finally:  # blocks are spread over workers: a cache kept here would outlive the study, so it goes now
        runner.engine.close()
    notes = WORKER.notes.get(model, []) + runner.notes()
    return {"clean": runner.clean_row(), "rows": rows, "notes": notes}
