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
result); the shared driver (:func:`lesionbench.executors.driver.drive`, the local executor's too)
appends the clean row once per model and a block's rows once, when its task returns (a retried
task returns once), ticking the progress bar once per cell, so ``--resume`` works across
executors. A task is submitted with its job's identity (model and block), which also names it in
an error. The worker side is :mod:`lesionbench.executors.ray_worker`.

Numbers equal a local run's: every cell is seeded from what it is, not from where or when it
runs, and a worker uses as many torch threads as the driver (each task asks Ray for that many
CPUs), since Ray's workers would otherwise run with one thread (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lesionbench.errors import LesionbenchError
from lesionbench.executors import ExecutorPlugin
from lesionbench.hookspecs import hookimpl

if TYPE_CHECKING:  # the heavy modules load when a run starts, not when the plugin is listed
    from lesionbench.executors.driver import Finished, Job
    from lesionbench.plan import Plan
    from lesionbench.registry import Registry
    from lesionbench.study import Study

log = logging.getLogger("lesionbench")

INSTALL_HINT = "pip install lesionbench[ray]"
MAX_RETRIES = 3  # a block whose worker dies is run again, on any worker, up to this many times


def require_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LesionbenchError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_device_name(name: str) -> None:
    """The study's device as a name (the driver needs no GPU: workers have them)."""
    import torch

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
        import torch

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

    models = tuple(
        replace(m, checkpoint=absolute(m.checkpoint), init_checkpoint=absolute(m.init_checkpoint)) for m in study.models
    )
    return replace(study, models=models, dataset=replace(study.dataset, path=absolute(study.dataset.path)))


class RayExecutor:
    """Blocks as Ray tasks (see the module's docstring); ``address`` as for ``ray.init``."""

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def prepare(self, study: Study, registry: Registry) -> Plan:
        """The driver's plan: every check, on the CPU (the driver evaluates nothing)."""
        from lesionbench.plan import prepare

        require_ray()  # before anything else: one line, nothing written
        return prepare(driver_study(study), registry)

    @contextmanager
    def session(self, plan: Plan, registry: Registry) -> Iterator:
        from lesionbench.executors.driver import drive

        with ray_cluster(self.address) as cluster:
            worker_study = replace(plan.study, device=cluster.device_for(plan.study))
            probe(cluster, worker_study, registry)  # a plugin missing on workers: nothing written
            backend = ray_backend(cluster, registry, worker_study)
            yield lambda store, tick, debug: drive(plan, store, tick, debug, backend)


def ray_backend(cluster: RayCluster, registry: Registry, worker_study: Study) -> Callable[..., Iterator[Finished]]:
    """The driver's backend on Ray: one task per job, results as tasks finish.

    ``worker_study`` is what workers prepare (the device resolved for the cluster); the plan the
    driver holds was prepared on the CPU. Each evaluation set goes into the object store once.
    """

    def evaluate(plan: Plan, jobs: Sequence[Job], debug: bool, note: Callable[[str], None]) -> Iterator[Finished]:
        from itertools import groupby

        from lesionbench.cells import eval_sets
        from lesionbench.data import EvalSetCache
        from lesionbench.executors.driver import Finished
        from lesionbench.executors.ray_worker import run_block

        ray = cluster.ray
        study_dict = portable(worker_study).to_dict()
        key = study_key(study_dict)
        plugins = plugin_modules(registry)
        task, threads = _remote(cluster, worker_study, run_block)
        cache = EvalSetCache()
        put: dict[int, Any] = {}  # id(EvalSet) -> its object ref: each set goes into the store once

        def ref_of(eval_set):
            if eval_set is not None and id(eval_set) not in put:
                put[id(eval_set)] = ray.put(eval_set)
            return None if eval_set is None else put[id(eval_set)]

        pending: dict[Any, Job] = {}
        try:
            for name, group in groupby(jobs, key=lambda j: j.model):
                refs = [ref_of(s) for s in eval_sets(plan, cache, plan.model(name))]
                for job in group:
                    ref = task.remote(
                        study_dict, key, plugins, name, job.block, job.done, [refs[0]], [refs[1]], threads, debug
                    )
                    pending[ref] = job
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    job = pending.pop(ref)
                    result = _get(ray, ref, job.describe())  # the job's identity, not a parsed label
                    yield Finished(job, lambda r=result: r["clean"], result["rows"], lambda r=result: r["notes"])
        finally:
            for ref in pending:
                ray.cancel(ref)

    return evaluate


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
    from lesionbench.executors.ray_worker import check_worker

    ray = cluster.ray
    study_dict = portable(study).to_dict()
    task, threads = _remote(cluster, study, check_worker)
    _get(ray, task.remote(study_dict, study_key(study_dict), plugin_modules(registry), threads))


def _remote(cluster: RayCluster, study: Study, fn):
    """``fn`` as a Ray task with the resources of one block, and the torch threads it runs with.

    On a GPU: one GPU per task. On the CPU: as many CPUs (and torch threads) as the driver uses,
    capped at the largest node, so the floats equal a local run's and no node is oversubscribed.
    """
    import torch

    gpu = torch.device(study.device).type == "cuda"
    threads = 1 if gpu else min(torch.get_num_threads(), cluster.max_node_cpus())
    options = {"num_cpus": threads, "num_gpus": 1 if gpu else 0}
    # max_calls=0: keep the worker (and the models it built) for the next block, GPU tasks too
    return cluster.ray.remote(max_calls=0, max_retries=MAX_RETRIES, **options)(fn), threads


@hookimpl
def lesionbench_executors():
    return [
        ExecutorPlugin(
            "ray",
            "One Ray task per block on a Ray cluster (pip install 'lesionbench[ray]').",
            RayExecutor,
            {"address": "the Ray cluster: auto (this node's cluster) or ray://host:10001 (default: start a local one)"},
        )
    ]
