"""The Python API: the same flow as ``lesionbench run``, for notebooks and scripts.

* :func:`run` — a study (preset name, TOML path, mapping or :class:`Study`) → results DataFrame;
  in memory, or in a crash-safe run directory with ``out``. It also takes a user's own
  ``nn.Module`` and data (an ``(images, labels)`` pair or a ``DataLoader``) with no plugin to write.
* :func:`lesioned` — damage one layer of any module exactly as a study's cell would, and restore
  it bit for bit on exit, for users with their own evaluation loop.
* :func:`load_results` — result files or run directories → one DataFrame, for the score functions;
  :func:`load_outcomes` — the same with the per-image outcomes (intervals, per-class accuracy).

:func:`run` and the readers are here; :func:`run_study` (what ``run`` and the command line share) is
:mod:`lesionbench.api_runner`'s and :func:`lesioned` :mod:`lesionbench.api_lesioned`'s, both re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lesionbench.api_lesioned import lesioned
from lesionbench.api_runner import ProgressFactory, all_done, plugin_versions, run_study, subset_of
from lesionbench.data import RawDataset
from lesionbench.errors import LesionbenchError
from lesionbench.executors import DEFAULT_EXECUTOR
from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel, ModelSpec
from lesionbench.registry import Registry, create_registry, get_registry
from lesionbench.store import Outcomes, read_results, read_results_with_outcomes
from lesionbench.study import Study, load_study, parse_study, with_overrides

# ------------------------------------------------------------------------------------ run()


class _TensorData:
    """A dataset plugin over tensors already in memory (the API's ``data=``)."""

    description = "images and labels given to lesionbench.run() as tensors or a DataLoader"
    default_path = None

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None, name: str = "tensors"
    ) -> None:
        self.images, self.labels, self.name = images, labels, name
        self.num_classes = num_classes or int(labels.max()) + 1

    def load(self, path: str | None, split: str) -> RawDataset:
        images = self.images
        return RawDataset(
            self.name, "<memory>", self.labels.numpy().astype(np.int64), self.num_classes, lambda i: images[i]
        )


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
            raise LesionbenchError(
                "data must be an (images, labels) pair of tensors or a DataLoader of such pairs"
            ) from None
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
    raise LesionbenchError(
        f"study must be a preset name, a TOML path, a mapping or a Study, not {type(study).__name__}"
    )


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
        dataset = replace(
            parsed.dataset,
            name=dataset_name,
            path=None,
            split="test",
            n_images=options.pop("n_images", None),
            subset_seed=options.pop("subset_seed", parsed.dataset.subset_seed),
        )
        parsed = replace(parsed, dataset=dataset)
    parsed = with_overrides(parsed, **options)
    modes = {n: m.training for n, m in modules.items()}
    try:
        store = run_study(
            parsed,
            registry,
            Path(out) if out is not None else None,
            resume=resume,
            progress=_progress_factory(progress),
            executor=executor,
            executor_options=executor_options,
        )
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


# ------------------------------------------------------------------------------------ load_results()


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


# run_study and its helpers are lesionbench.api_runner's, lesioned is lesionbench.api_lesioned's: imported from here as before
__all__ = [
    "ProgressFactory",
    "all_done",
    "lesioned",
    "load_outcomes",
    "load_results",
    "plugin_versions",
    "run",
    "run_study",
    "subset_of",
]
