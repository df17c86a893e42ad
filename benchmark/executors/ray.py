"""Executors other than the in-process loop: the blocks of a study on a Ray cluster.

The unit of work is one :class:`lesionbench.plan.Block` (model × layer × perturbation, all its
levels and draws), run as a Ray **task**. Tasks rather than a pool of actors, because:

* a worker that dies costs only its block, and Ray replays a task on any live worker by itself
  (``max_retries``); an actor pool would need ``max_restarts``/``max_task_retries`` and its own
  bookkeeping of which actor held which block;
* tasks spread over whatever the cluster has (heterogeneous nodes, an autoscaler adding some)
  with no pool size to choose;
* what an actor would keep — the prepared study and each model's :class:`ModelRunner` — is kept
  here in the worker *process* (one :class:`WorkerState`, keyed by a hash of the whole study), and
  Ray reuses worker processes across tasks, so a worker builds each model once. ``max_calls=0`` keeps that
  true for GPU tasks, which Ray otherwise restarts after every call.

The driver prepares the plan (every check, before anything is written), decodes each evaluation
set once and puts it into the object store once; tasks receive the reference inside a list, so a
worker fetches it only when it builds a runner, never decodes images itself. Each task returns
its block's rows (cells not already in the run directory) together with the model's clean row
(each worker's runner evaluates the clean model once anyway: the identity level's rows are that
result); the driver appends the clean row once per model and a block's rows once, when its task returns
(a retried task returns once), ticking the progress bar once per cell, so ``--resume`` works
across executors through ``RunDir.completed()`` exactly as in the local executor.

Numbers equal a local run's: every cell is seeded from what it is, not from where or when it
runs, and a worker uses as many torch threads as the driver (each task asks Ray for that many
CPUs), since Ray's workers would otherwise run with one thread (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from lesionbench.cells import ModelRunner, eval_sets
from lesionbench.data import EvalSetCache
from lesionbench.errors import LesionbenchError
from lesionbench.plan import Plan, prepare
from lesionbench.registry import Registry, get_registry
from lesionbench.store import Store
from lesionbench.study import Study, parse_study

log = logging.getLogger("lesionbench")

INSTALL_HINT = "pip install lesionbench[ray]"
MAX_RETRIES = 3  # a block whose worker dies is run again, on any worker, up to this many times
RUNNERS_PER_WORKER = 2  # model runners a worker keeps (the driver submits blocks model by model)


def require_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LesionbenchError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_device_name(name: str) -> None:
    """The study's device as a name (the driver needs no GPU: workers have them)."""
    if name in (None, "", "auto"):
        return
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise LesionbenchError(f"unknown device {name!r}: {str(exc).splitlines()[0]}") from None
    if device.type not in ("cpu", "cuda"):
        raise LesionbenchError(f"device {name!r} is not supported (cpu, cuda, cuda:N or auto)")


def driver_study(study: Study) -> Study:
    """The study as the driver prepares it: every check, but on the CPU (it evaluates nothing)."""
    check_device_name(study.device)
    return replace(study, device="cpu")


@dataclass
class RayCluster:
    """A connection to Ray: local (started here), ``auto`` (this node's cluster) or ``ray://``."""

    ray: Any

    def device_for(self, study: Study) -> str:
        """``cuda`` when the study asks for it (or says auto and the cluster has GPUs), else ``cpu``."""
        gpus = self.ray.cluster_resources().get("GPU", 0)
        name = study.device
        if name in (None, "", "auto"):
            return "cuda" if gpus > 0 else "cpu"
        if torch.device(name).type == "cuda":
            if gpus <= 0:
                raise LesionbenchError(f"device {name!r} asked for, but the Ray cluster has no GPUs (use cpu or auto)")
            return "cuda"  # a worker sees only the GPU Ray gave it, as cuda:0
        return "cpu"

    def max_node_cpus(self) -> int:
        cpus = [n.get("Resources", {}).get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")]
        return max(1, int(max(cpus, default=1)))


@contextmanager
def ray_cluster(address: str | None):
    """Connect to Ray and yield a RayCluster; a Ray this call started is shut down at the end.

    ``address`` None starts a local instance (or joins ``RAY_ADDRESS``, as ``ray.init`` does); a
    connection this process already made (a notebook, the tests) is used as it is.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield RayCluster(ray)
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = False  # only for a cluster we start ourselves
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"connect to Ray at {address}" if address else "start Ray"
        raise LesionbenchError(f"cannot {where}: {str(exc).splitlines()[0]}") from None
    try:
        yield RayCluster(ray)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------ driver


def plugin_modules(registry) -> dict[str, str]:
    """Each loaded plugin's name and module, for a worker to say which one it lacks."""
    return {name: getattr(p, "__name__", type(p).__module__) for name, p in registry.pm.list_name_plugin()}


def study_key(study_dict: dict) -> str:
    """What a worker caches a prepared study by: the whole study (device and engine included)."""
    return hashlib.sha256(json.dumps(study_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


def portable(study: Study) -> Study:
    """Paths made absolute where they exist here, so a worker with another working directory finds them."""
    from pathlib import Path

    def absolute(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    models = tuple(replace(m, checkpoint=absolute(m.checkpoint), init_checkpoint=absolute(m.init_checkpoint))
                   for m in study.models)  # fmt: skip
    return replace(study, models=models, dataset=replace(study.dataset, path=absolute(study.dataset.path)))


class RayExecutor:
    """Blocks as Ray tasks (see the module's docstring); ``address`` as for ``ray.init``."""

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def prepare(self, study: Study, registry: Registry) -> Plan:
        """The driver's plan: every check, on the CPU (the driver evaluates nothing)."""
        require_ray()  # before anything else: one line, nothing written
        return prepare(driver_study(study), registry)

    @contextmanager
    def session(self, plan: Plan, registry: Registry) -> Iterator:
        with ray_cluster(self.address) as cluster:
            worker_study = replace(plan.study, device=cluster.device_for(plan.study))
            probe(cluster, worker_study, registry)  # a plugin missing on workers: nothing written
            yield lambda store, tick, debug: execute_ray(cluster, plan, store, registry, tick, debug, worker_study)


def execute_ray(
    cluster: RayCluster,
    plan: Plan,
    run: Store,
    registry: Registry,
    progress: Callable[[str], None] | None = None,
    debug: bool = False,
    worker_study: Study | None = None,
) -> None:
    """Evaluate every cell of ``plan`` not already in ``run`` on Ray, appending rows as blocks finish.

    ``plan`` is the driver's (prepared on the CPU); ``worker_study`` what workers prepare (the
    device resolved for the cluster).
    """
    ray = cluster.ray
    tick = progress or (lambda _desc: None)
    study = worker_study or plan.study
    study_dict = portable(study).to_dict()
    key = study_key(study_dict)
    plugins = plugin_modules(registry)
    task, threads = _remote(cluster, study, run_block)

    done = run.completed()
    cache = EvalSetCache()
    put: dict[int, Any] = {}  # id(EvalSet) -> its object ref: each set goes into the store once

    def ref_of(eval_set):
        if eval_set is None:
            return None
        if id(eval_set) not in put:
            put[id(eval_set)] = ray.put(eval_set)
        return put[id(eval_set)]

    pending: dict[Any, tuple[str, list[str]]] = {}  # task -> (model, labels of its cells)
    clean_needed: set[str] = set()
    notes_seen: set[str] = set()
    try:
        for prepared in plan.models:
            name = prepared.loaded.name
            if plan.key(name) in done:
                tick(f"{name}: clean (done earlier)")
            else:
                clean_needed.add(name)
            todo = []
            for block in plan.blocks(prepared):
                cells = plan.block_cells(prepared, block)
                labels = [plan.label(name, c) for c in cells]
                if plan.settled(prepared, block, done):  # adaptive draws included
                    for label in labels:
                        tick(label)
                    continue
                todo.append((block, plan.done_of(name, block, done), labels))
            if not todo and name not in clean_needed:
                continue
            refs = [ref_of(s) for s in eval_sets(plan, cache, prepared)]
            if not todo:  # every cell written earlier but the clean row: a task for the clean row alone
                todo.append((None, set(), []))
            for block, block_done, labels in todo:
                ref = task.remote(study_dict, key, plugins, name, block, block_done, [refs[0]], [refs[1]],
                                  threads, debug)  # fmt: skip
                pending[ref] = (name, labels)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                name, labels = pending.pop(ref)
                result = _get(ray, ref, labels[0].rsplit(" ", 2)[0] if labels else f"{name} · clean")
                if name in clean_needed:
                    run.append(result["clean"])
                    clean_needed.discard(name)
                    tick(f"{name}: clean")
                for row in result["rows"]:
                    run.append(row)
                for label in labels:
                    tick(label)
                for note in result["notes"]:
                    if note not in notes_seen:
                        notes_seen.add(note)
                        run.note(note)
    finally:
        for ref in pending:
            ray.cancel(ref)


def _get(ray, ref, what: str = "the study on a worker") -> dict:
    """A task's result; a worker's LesionbenchError, a missing module, or a block Ray gave up on
    (its worker died more than MAX_RETRIES times) as one line here."""
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LesionbenchError):
            raise LesionbenchError(str(cause)) from None
        if isinstance(cause, ModuleNotFoundError):
            raise LesionbenchError(
                f"a Ray worker cannot import {cause.name!r}: lesionbench and the plugin packages must be "
                "installed on every worker"
            ) from None
        raise
    except RayError as exc:
        raise LesionbenchError(
            f"Ray could not run {what} ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); the rows "
            "written so far are kept, and --resume finishes the rest"
        ) from None


def probe(cluster: RayCluster, study: Study, registry) -> None:
    """Prepare the study on one worker before anything is written: a missing plugin fails here."""
    ray = cluster.ray
    study_dict = portable(study).to_dict()
    task, threads = _remote(cluster, study, check_worker)
    _get(ray, task.remote(study_dict, study_key(study_dict), plugin_modules(registry), threads))


def _remote(cluster: RayCluster, study: Study, fn):
    """``fn`` as a Ray task with the resources of one block, and the torch threads it runs with.

    On a GPU: one GPU per task. On the CPU: as many CPUs (and torch threads) as the driver uses,
    capped at the largest node, so the floats equal a local run's and no node is oversubscribed.
    """
    gpu = torch.device(study.device).type == "cuda"
    threads = 1 if gpu else min(torch.get_num_threads(), cluster.max_node_cpus())
    options = {"num_cpus": threads, "num_gpus": 1 if gpu else 0}
    # max_calls=0: keep the worker (and the models it built) for the next block, GPU tasks too
    return cluster.ray.remote(max_calls=0, max_retries=MAX_RETRIES, **options)(fn), threads


# ------------------------------------------------------------------------------------ worker

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


def run_block(study_dict: dict, key: str, plugins: dict[str, str], model: str, block, done: dict,
              eval_ref: list, calibration_ref: list, threads: int, debug: bool) -> dict:  # fmt: skip
    """A Ray task: the rows of one block not in ``done`` (``block`` None: only the clean row)."""
    torch.set_num_threads(threads)
    WORKER.plan_for(study_dict, key, plugins)
    runner = WORKER.runner(model, eval_ref, calibration_ref, debug)
    try:
        rows = [] if block is None else [row for row, _label in runner.block_rows(block, done) if row is not None]
    finally:  # blocks are spread over workers: a cache kept here would outlive the study, so it goes now
        runner.engine.close()
    notes = WORKER.notes.get(model, []) + runner.notes()
    return {"clean": runner.clean_row(), "rows": rows, "notes": notes}
