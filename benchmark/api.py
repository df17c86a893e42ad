"""The Python API: the same flow as ``lesionbench run``, for notebooks and scripts.

* :func:`run` — a study (preset name, TOML path, mapping or :class:`Study`) → results DataFrame;
  in memory, or in a crash-safe run directory with ``out``. It also takes a user's own
  ``nn.Module`` and data (an ``(images, labels)`` pair or a ``DataLoader``) with no plugin to write.
* :func:`lesioned` — damage one layer of any module exactly as a study's cell would, and restore
  it bit for bit on exit, for users with their own evaluation loop.
* :func:`load_results` — result files or run directories → one DataFrame, for the score functions;
  :func:`load_outcomes` — the same with the per-image outcomes (intervals, per-class accuracy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lesionbench import __version__
from lesionbench.data import RawDataset
from lesionbench.errors import LesionbenchError
from lesionbench.executors import DEFAULT_EXECUTOR, Tick, create_executor
from lesionbench.graph import ModelGraph, check_module
from lesionbench.hookspecs import hookimpl
from lesionbench.kinds import perturbation_kind
from lesionbench.layers import select_layers
from lesionbench.model_sources import LoadedModel, ModelSpec
from lesionbench.perturbation import Perturbation, cell_seed, check_levels, generator_for, perturbed
from lesionbench.plan import Plan, hookable, model_dtype
from lesionbench.registry import Registry, create_registry, get_registry
from lesionbench.schema import check_plan
from lesionbench.store import MemoryStore, Outcomes, RunDir, Store, Subset, read_results, read_results_with_outcomes
from lesionbench.study import Study, load_study, parse_study, with_overrides

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
                    raise LesionbenchError(f"--redo {', '.join(unknown)}: not a perturbation of the study in "
                                           f"{str(out)!r} (its perturbations: {', '.join(plan.perturbations)})")  # fmt: skip
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
    return Subset(plan.study.dataset.name, plan.study.dataset.split, np.asarray(plan.indices, np.int64),
                  np.asarray(plan.raw.labels[plan.indices], np.int64), plan.raw.tokens)  # fmt: skip


def all_done(plan: Plan, store: Store) -> bool:
    """Whether ``store`` holds every cell of ``plan``, adaptive draws included (a resumed run with nothing left to do)."""
    done = store.completed()
    return all(plan.key(m.loaded.name) in done and all(plan.settled(m, b, done) for b in plan.blocks(m))
               for m in plan.models)  # fmt: skip


# ------------------------------------------------------------------------------------ run()


class _TensorData:
    """A dataset plugin over tensors already in memory (the API's ``data=``)."""

    description = "images and labels given to lesionbench.run() as tensors or a DataLoader"
    default_path = None

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None, name: str = "tensors") -> None:
        self.images, self.labels, self.name = images, labels, name
        self.num_classes = num_classes or int(labels.max()) + 1

    def load(self, path: str | None, split: str) -> RawDataset:
        images = self.images
        return RawDataset(self.name, "<memory>", self.labels.numpy().astype(np.int64), self.num_classes,
                          lambda i: images[i])  # fmt: skip


class _ModuleSource:
    """A model plugin claiming the names of modules given to lesionbench.run()."""

    name = "python"
    description = "nn.Module objects given to lesionbench.run()"

    def __init__(self, modules: Mapping[str, nn.Module], input_size: tuple[int, ...]) -> None:
        self.modules, self.input_size = dict(modules), input_size

    def claims(self, arch: str) -> bool:
        return arch in self.modules

    def examples(self) -> list[str]:
        return list(self.modules)

    def build(self, spec: ModelSpec) -> LoadedModel:
        return LoadedModel(spec.arch, self.modules[spec.arch], self.input_size, _as_float, "tensor")


def _as_float(x: Any) -> torch.Tensor:
    return x if x.is_floating_point() else x.float()


def _collect(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` tensors from a pair or from every batch of a DataLoader."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
    else:
        try:
            batches = [(b[0], b[1]) for b in data]
        except (TypeError, IndexError):
            raise LesionbenchError("data must be an (images, labels) pair of tensors or a DataLoader of such pairs") from None
        if not batches:
            raise LesionbenchError("the DataLoader given as data yields no batches")
        images, labels = torch.cat([b[0] for b in batches]), torch.cat([torch.as_tensor(b[1]) for b in batches])
    if len(images) != len(labels) or labels.dim() != 1 or labels.is_floating_point():
        raise LesionbenchError(
            f"data: expected images [N, ...] and integer labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    return images.detach().cpu(), labels.detach().cpu().long()


def _as_study(study: Any, registry: Registry) -> Study:
    if isinstance(study, Study):
        return study
    if isinstance(study, (str, Path)):
        presets = {k: c.obj for k, c in registry.contributions("studies").items()}
        return load_study(str(study), presets)
    raise LesionbenchError(f"study must be a preset name, a TOML path, a mapping or a Study, not {type(study).__name__}")


def run(
    study: str | Path | Mapping[str, Any] | Study | None = None,
    out: str | Path | None = None,
    *,
    model: nn.Module | Mapping[str, nn.Module] | None = None,
    data: Any = None,
    num_classes: int | None = None,
    resume: bool = False,
    registry: Registry | None = None,
    with_outcomes: bool = False,
    progress: bool | Callable[[int, int, str], object] = True,
    dataset_name: str = "tensors",
    executor: str = DEFAULT_EXECUTOR,
    executor_options: Mapping[str, Any] | None = None,
    disable: Sequence[str] = (),
    **options: Any,
) -> pd.DataFrame | tuple[pd.DataFrame, Outcomes]:
    """Run a study and return its results table (one row per cell, as ``results.csv``); with
    ``with_outcomes=True`` the table with an ``outcome`` column and the per-image
    :class:`~lesionbench.store.Outcomes` it points into (as :func:`load_outcomes` gives).

    ``study``: a preset name, a TOML path, a mapping shaped like a study file, or a Study.
    ``out``: None keeps everything in memory (nothing is written); a directory gets the same
    crash-safe run directory as ``lesionbench run --out``. ``model``: an ``nn.Module`` (named
    ``model``) or a mapping of names to modules, studied without writing a plugin; ``data``: an
    ``(images, labels)`` pair of tensors (images already preprocessed, labels int64 [N]), a
    DataLoader yielding such pairs, or a dataset path for the study's dataset plugin. Rows are named
    by the mapping's keys (``model={"resnet18_ft": net}``; a bare module is ``model``) and, for data
    given as tensors or a DataLoader, ``dataset_name`` (default ``tensors``). With ``model``/``data`` the study may be omitted (defaults:
    the paper's three perturbations, every layer, 5 draws, every image). Further keyword
    arguments override study options (``draws=2``, ``layers=[...]``, ``levels=[...]``,
    ``n_images=...``). A module given here is restored bit for bit and left in its own mode.

    ``progress``: True (default) shows the cells done, elapsed time and ETA on standard error, as a
    live bar on a terminal or in a notebook and as a plain line at most every 30 s elsewhere (logs,
    CI); False is silent; a callable is called as ``progress(done, total, cell_description)`` after
    each cell (``done``, ``total``: counts of cells).

    ``executor``/``executor_options``: where the blocks run (``lesionbench list executors``; default
    ``local``). ``disable``: plugin names left out, as ``lesionbench -p no:NAME`` (not with ``registry``).

    Raises :class:`LesionbenchError` for bad input, before anything is evaluated.
    """
    if isinstance(data, (str, Path)):  # a dataset path, as the command line's --data
        options["data"], data = str(data), None
    extra = []
    modules: dict[str, nn.Module] = {}
    if model is not None:
        modules = dict(model) if isinstance(model, Mapping) else {"model": model}
        if not all(isinstance(m, nn.Module) for m in modules.values()):
            raise LesionbenchError("model must be an nn.Module or a mapping of names to nn.Module")
    if data is not None:
        images, labels = _collect(data)
        if not isinstance(dataset_name, str) or not dataset_name.strip():
            raise LesionbenchError(f"dataset_name must be a non-empty string, not {dataset_name!r}")
        extra.append(("python-data", _Plugin(datasets=[_TensorData(images, labels, num_classes, dataset_name)])))
        if modules:
            extra.append(("python-models", _Plugin(models=[_ModuleSource(modules, tuple(images.shape[1:]))])))
    elif modules:
        raise LesionbenchError("a model given as an object needs data=(images, labels) or a DataLoader")
    if registry is None:
        registry = create_registry(extra, disable=disable) if extra or disable else get_registry()
    else:
        for name, plugin in extra:
            registry.register(plugin, name)
    if study is None and not modules:
        raise LesionbenchError("give a study, or a model and data")
    if study is None or isinstance(study, Mapping):  # the given modules fill in a study's models
        mapping = {"name": "python", **dict(study or {})}
        if modules:
            mapping.setdefault("models", list(modules))
        parsed = parse_study(mapping)
    else:
        parsed = _as_study(study, registry)
        if modules:
            parsed = replace(parsed, models=tuple(ModelSpec(n) for n in modules))
    if data is not None:
        dataset = replace(parsed.dataset, name=dataset_name, path=None, split="test",
                          n_images=options.pop("n_images", None),
                          subset_seed=options.pop("subset_seed", parsed.dataset.subset_seed))  # fmt: skip
        parsed = replace(parsed, dataset=dataset)
    parsed = with_overrides(parsed, **options)
    modes = {n: m.training for n, m in modules.items()}
    try:
        store = run_study(parsed, registry, Path(out) if out is not None else None, resume=resume,
                          progress=_progress_factory(progress), executor=executor,
                          executor_options=executor_options)  # fmt: skip
    finally:
        for n, m in modules.items():
            m.train(modes[n])
    return store.outcomes() if with_outcomes else store.frame()


def _progress_factory(progress: Any) -> ProgressFactory | None:
    """run()'s ``progress=`` as the factory run_study takes (the display lives with the command line's)."""
    from functools import partial

    from lesionbench.cli.progress import callback_progress, stderr_progress

    if progress is True:
        return stderr_progress
    if progress is False or progress is None:
        return None
    if callable(progress):
        return partial(callback_progress, progress)
    raise LesionbenchError(f"progress must be True, False or a callable(done, total, description), not {progress!r}")


class _Plugin:
    """A plugin object built in code (the API's own model and data sources)."""

    def __init__(self, models: Sequence = (), datasets: Sequence = ()) -> None:
        self._models, self._datasets = list(models), list(datasets)

    @hookimpl
    def lesionbench_models(self):
        return self._models

    @hookimpl
    def lesionbench_datasets(self):
        return self._datasets


# ------------------------------------------------------------------------------------ lesioned()


def _example_for(model: nn.Module) -> torch.Tensor | None:
    """A one-image input, when the model says its input size (timm's cfg) or starts with a Linear."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    dtype = model_dtype(model)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return torch.zeros(1, *cfg["input_size"], dtype=dtype)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features, dtype=dtype)
    return None


@contextmanager
def lesioned(
    model: nn.Module,
    layer: str,
    perturbation: str | Perturbation,
    level: float,
    *,
    seed: int = 0,
    draw: int = 0,
    model_name: str = "model",
    example: torch.Tensor | None = None,
    registry: Registry | None = None,
) -> Iterator[nn.Module]:
    """Damage one layer of ``model`` as a study's cell would, yield the model, restore it on exit.

    The damage is the one a study with seed ``seed`` draws for model ``model_name``, layer
    ``layer`` (module path or alias), level ``level`` and draw ``draw``: the same generator seed
    and the same layer analysis (``example``, one input batch, finds the BatchNorms a unit feeds;
    it may be omitted for timm models and models whose first layer is Linear). Every tensor is
    put back bit for bit on exit, also after an exception.

    Raises :class:`LesionbenchError` for an unknown layer or perturbation or a level out of range.
    """
    registry = registry or get_registry()
    p = registry.get("perturbations", perturbation) if isinstance(perturbation, str) else perturbation
    (level,) = check_levels(p, [level])
    p.check_level(level)
    if example is None:
        example = _example_for(model)
        if example is None:
            raise LesionbenchError("pass example=<an input batch> so that the layer's place in the network can be found")
    check_module(model, model_name)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    graph = ModelGraph.of(model, example[:1].to(device=device, dtype=model_dtype(model)))
    if layer in graph.left_out:
        raise LesionbenchError(f"layer {layer!r} cannot be perturbed: {graph.left_out[layer]}")
    (target,) = select_layers(graph.layers, [layer])
    if perturbation_kind(p.kind).hooked:
        hookable([target], p.name, model_name, True, [])
    p.check_layer(target)
    seed_value = cell_seed(seed, model_name, target.name, p.name, level, draw)
    with perturbed(target, p, level, generator_for(seed_value)):
        yield model


def _paths(paths: tuple) -> list:
    """Paths given one by one or as one list (``load_results(a, b)`` or ``load_results([a, b])``)."""
    flat = [q for p in paths for q in (p if isinstance(p, (list, tuple)) else [p])]
    bad = [p for p in flat if not isinstance(p, (str, Path))]
    if bad:
        raise LesionbenchError(f"results paths must be str or Path, got {type(bad[0]).__name__}")
    return flat


def load_results(*paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One results table from ``results.csv`` files or run directories (or one list of them), each
    checked against the results schema (:mod:`lesionbench.schema`); raises LesionbenchError for a
    file that breaks it (one line: file, row, field) or holds no rows."""
    if not _paths(paths):
        raise LesionbenchError("load_results needs at least one results file or run directory")
    return read_results(_paths(paths), allow_empty=False)


def load_outcomes(*paths: str | Path | Sequence[str | Path]) -> tuple[pd.DataFrame, Outcomes]:
    """The results table of ``results.csv`` files or run directories, with an ``outcome`` column,
    and the per-image outcomes it points into (``outcomes.arrow`` of each run; runs made before
    outcomes were kept contribute rows with ``outcome`` -1). For :func:`lesionbench.bootstrapping`
    and :func:`lesionbench.per_class_accuracy`."""
    if not _paths(paths):
        raise LesionbenchError("load_outcomes needs at least one results file or run directory")
    return read_results_with_outcomes(_paths(paths), allow_empty=False)


__all__ = ["lesioned", "load_outcomes", "load_results", "run", "run_study"]
