"""The plan: a study checked against the plugins, data and models, cut into blocks and cells.

Everything that can be checked before the first evaluation (names, levels, data path, weights,
layers, label range, the model's output) is checked here, before any run directory exists, so
bad input leaves nothing behind. The plan's fingerprint covers everything that changes the
numbers, including each perturbation's levels as resolved (a changed default is a new study).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lesionbench import adaptive
from lesionbench.adaptive import extra_draws  # noqa: F401 - re-exported (its home before adaptive.py)
from lesionbench.applicability import check_by_forward, hookable
from lesionbench.data import RawDataset, stratified_subset
from lesionbench.errors import LesionbenchError, blame, internal_failure
from lesionbench.evaluate import resolve_device
from lesionbench.graph import ModelGraph, check_module, run_once
from lesionbench.kinds import perturbation_kind
from lesionbench.layers import Layer, select_layers, spread_layers
from lesionbench.model_sources import LoadedModel, create_model, resolve_source
from lesionbench.names import named
from lesionbench.perturbation import Perturbation, cell_seed, check_levels
from lesionbench.registry import Registry
from lesionbench.store import CLEAN, CellKey, cell_key
from lesionbench.study import DatasetSpec, Study

BN_SUFFIX = "+bn_recalibrate"


@dataclass(frozen=True)
class Cell:
    """One evaluation: a layer of a model under one perturbation level and draw."""

    layer: Layer
    perturbation: Perturbation
    level: float
    draw: int

    @property
    def is_identity(self) -> bool:
        return self.level == self.perturbation.identity_level


@dataclass(frozen=True)
class Block:
    """The unit of work: one model × layer × perturbation, all its levels and draws.

    A worker builds the model and the layer's cached activations once and evaluates the whole
    block; executors (local, Ray) schedule blocks.
    """

    model: str
    layer: str  # the layer's display name
    perturbation: str


@dataclass
class PreparedModel:
    """A built model, its graph, the layers the study perturbs, and what was left out and why."""

    loaded: LoadedModel
    graph: ModelGraph
    layers: list[Layer]
    targets: dict[str, list[Layer]]  # perturbations with a layer axis of their own (e.g. stages)
    dtype: torch.dtype = torch.float32
    notes: list[str] = field(default_factory=list)  # for run.log
    plugin: str = ""  # the plugin whose source built the model: named when the model's own code fails

    def targets_of(self, perturbation: str) -> list[Layer]:
        return self.targets.get(perturbation, self.layers)


@dataclass
class Plan:
    """A validated study: resolved plugins, data, models and the cells to evaluate."""

    study: Study
    perturbations: dict[str, tuple[Perturbation, tuple[float, ...]]]
    raw: RawDataset
    indices: np.ndarray
    models: list[PreparedModel]
    calibration: np.ndarray | None = None  # indices of the BatchNorm calibration subset (bn_recalibrate)

    def fingerprint(self) -> str:
        """Hash of everything that determines the numbers, levels as resolved included."""
        payload = self.study.numbers() | {
            "resolved_levels": {name: list(levels) for name, (_p, levels) in sorted(self.perturbations.items())}
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def blocks(self, prepared: PreparedModel) -> list[Block]:
        """A model's blocks, layer by layer in forward order."""
        out = []
        for name in self.perturbations:
            out.extend(Block(prepared.loaded.name, t.display, name) for t in prepared.targets_of(name))
        order = {layer.display: i for i, layer in enumerate(prepared.layers)}
        return sorted(out, key=lambda b: (order.get(b.layer, len(order)), b.layer))

    def block_cells(self, prepared: PreparedModel, block: Block) -> list[Cell]:
        """The cells of one block; the identity level is evaluated once (draw 0), as the clean model."""
        perturbation, levels = self.perturbations[block.perturbation]
        layer = next(t for t in prepared.targets_of(block.perturbation) if t.display == block.layer)
        out = []
        for level in levels:
            same_every_draw = level == perturbation.identity_level or perturbation.deterministic
            draws = 1 if same_every_draw else self.study.draws
            out.extend(Cell(layer, perturbation, level, d) for d in range(draws))
        return out

    @property
    def adaptive(self) -> bool:
        """Adaptive draws: more draws where a level's mean accuracy is still uncertain (``target_ci``)."""
        return self.study.target_ci is not None

    def extra_cells(self, cells: list[Cell], values: Mapping[tuple[float, int], float]) -> list[Cell]:
        """Adaptive draws: the draws to add to a block whose cells so far are ``cells`` with metric
        ``values`` by (level, draw) (the policy: :func:`lesionbench.adaptive.extra_cells`)."""
        if not self.adaptive:
            return []
        return adaptive.extra_cells(cells, values, self.study.target_ci, self.study.max_draws)

    def block_values(self, name: str, cells: list[Cell], done: Mapping) -> dict[tuple[float, int], float]:
        """The study metric, by (level, draw), of each cell of ``cells`` already in ``done`` (key → (top1, top5))."""
        column = 0 if self.study.metric == "top1" else 1
        out = {}
        for c in cells:
            v = done.get(self.key(name, c)) if isinstance(done, Mapping) else None
            if v is not None:
                out[(c.level, c.draw)] = v[column]
        return out

    def done_of(self, name: str, block: Block, done: Mapping) -> dict:
        """The entries of ``done`` that belong to one block (every draw, adaptive ones included)."""
        row_name = self.row_name(self.perturbations[block.perturbation][0])
        return {k: v for k, v in done.items() if k[0] == name and k[1] == block.layer and k[2] == row_name}

    def settled(self, prepared: PreparedModel, block: Block, done: Mapping) -> bool:
        """Every cell of the block is in ``done``, adaptive draws included (decided from ``done`` alone)."""
        name = prepared.loaded.name
        cells = self.block_cells(prepared, block)
        while cells:
            if any(self.key(name, c) not in done for c in cells):
                return False
            values = self.block_values(name, cells, done)
            extra = self.extra_cells(cells, values)
            if not extra:
                return True
            cells = cells + extra
        return True

    def cells(self, prepared: PreparedModel) -> list[Cell]:
        return [c for b in self.blocks(prepared) for c in self.block_cells(prepared, b)]

    def total(self) -> int:
        return sum(len(self.cells(m)) + 1 for m in self.models)

    def model(self, name: str) -> PreparedModel:
        return next(m for m in self.models if m.loaded.name == name)

    def label(self, name: str, cell: Cell) -> str:
        return f"{name} · {cell.layer.display} · {self.row_name(cell.perturbation)} {cell.level:g} #{cell.draw}"

    def key(self, name: str, cell: Cell | None = None) -> CellKey:
        """The results key of a model's cell (of its clean row when ``cell`` is None)."""
        if cell is None:
            return cell_key(name, "", CLEAN, 0.0, 0)
        return cell_key(name, cell.layer.display, self.row_name(cell.perturbation), cell.level, cell.draw)

    def row_name(self, perturbation: Perturbation) -> str:
        """The perturbation column of a row: recalibrated runs are a condition of their own."""
        return perturbation.name + (BN_SUFFIX if self.study.bn_recalibrate else "")

    def seed(self, name: str, cell: Cell) -> int:
        """The seed of a cell's generator: what the cell is, never where or when it runs."""
        return cell_seed(self.study.seed, name, cell.layer.name, cell.perturbation.name, cell.level, cell.draw)


def check_device(name: str) -> torch.device:
    """The study's device, or a clear error for a name torch does not know or a GPU that is absent."""
    try:
        device = resolve_device(name)
    except RuntimeError as exc:
        raise LesionbenchError(f"unknown device {name!r}: {str(exc).splitlines()[0]}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LesionbenchError(f"device {name!r} asked for, but CUDA is not available here (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LesionbenchError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise LesionbenchError(f"device {name!r} is not supported (cpu, cuda, cuda:N or auto)")
    return device


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (its first floating parameter's), float32 if none."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def resolve_perturbations(study: Study, registry: Registry) -> dict[str, tuple[Perturbation, tuple[float, ...]]]:
    """Each perturbation the study names with its levels, checked against its range and rules."""
    perturbations = {}
    for name in study.perturbations:
        p = registry.get("perturbations", name)
        levels = check_levels(p, study.levels.get(name, p.default_levels))
        with blame(registry.owner("perturbations", name), f"checking the levels of {name!r}"):
            for level in levels:
                p.check_level(level)  # a plugin's own rule (whole bits…), before anything runs
        perturbations[name] = (p, levels)
    unknown_levels = set(study.levels) - set(study.perturbations)
    if unknown_levels:
        raise LesionbenchError(f"levels given for perturbations not in the study: {', '.join(sorted(unknown_levels))}")
    return perturbations


def prepare_model(
    loaded: LoadedModel,
    study: Study,
    perturbations: dict,
    raw: RawDataset,
    max_label: int,
    registry: Registry,
    plugin: str,
) -> PreparedModel:
    """A built model analysed and checked: its graph, the study's layers, each perturbation's targets."""
    device = resolve_device(study.device)
    if device.type not in loaded.devices:
        raise LesionbenchError(
            f"model {loaded.name!r} runs on {' or '.join(loaded.devices)} only, not on {device}: "
            f"set device = {loaded.devices[0]!r} in the study or --device {loaded.devices[0]}"
        )
    if bool(raw.tokens) != (loaded.targets is not None):  # text needs a language model, and vice versa
        need = "a language model (hf: a causal LM)" if raw.tokens else "a text dataset (e.g. 'text')"
        what = f"dataset {raw.name!r} is text" if raw.tokens else f"model {loaded.name!r} is a language model"
        raise LesionbenchError(f"{what}: it needs {need}")
    dtype = model_dtype(loaded.module)
    example = torch.zeros(1, *loaded.input_size, dtype=dtype)
    check_module(loaded.module, loaded.name)
    with blame(plugin, f"running model {loaded.name!r} on one input of size {tuple(loaded.input_size)}"):
        run_once(loaded.module, example)
    try:  # the model ran: a failure from here on is lesionbench's own
        graph = ModelGraph.of(loaded.module, example, loaded.aliases)
    except (LesionbenchError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - our bug, reported as such
        raise internal_failure(f"analysing the layers of model {loaded.name!r}", exc) from None
    ref = loaded.name
    if max_label >= graph.num_classes:
        raise LesionbenchError(
            f"dataset {raw.name!r} has label {max_label} but model {ref!r} has only {graph.num_classes} classes"
        )
    for wanted in study.layers:
        if wanted in graph.left_out:
            raise LesionbenchError(f"layer {wanted!r} of model {ref!r} cannot be perturbed: {graph.left_out[wanted]}")
    if not graph.layers:
        why = "; ".join(f"{name}: {reason}" for name, reason in graph.left_out.items())
        raise LesionbenchError(
            f"model {ref!r} has no layer lesionbench can perturb"
            + (
                f" ({why})"
                if why
                else " (no Conv, Linear or transformers Conv1D module whose weight the forward pass reads)"
            )
        )
    notes = [f"{ref}: {name} left out: {why}" for name, why in graph.left_out.items() if not study.layers]
    if study.layer_count is not None:  # the same relative depths in every model, whatever its layers' names
        layers = spread_layers(graph.layers, study.layer_count)
        if len(layers) < study.layer_count:
            notes.append(
                f"{ref}: has {len(graph.layers)} layers, so {len(layers)} of layer_count = {study.layer_count} are distinct"
            )
    else:
        layers = select_layers(graph.layers, study.layers)
    layers = _with_initial(layers, loaded)
    targets = {}
    for name, (p, _levels) in perturbations.items():
        with blame(registry.owner("perturbations", name), f"finding what {name!r} perturbs in {loaded.name!r}"):
            own = p.targets(loaded.module, layers)  # e.g. residual stages: a model without any has no such blocks
        if own is not None:
            targets[name] = named(list(own), layers, loaded.aliases)  # one naming rule for targets and layers
        elif perturbation_kind(p.kind).hooked:
            targets[name] = hookable(layers, name, ref, bool(study.layers), notes)
    return PreparedModel(loaded, graph, layers, targets, dtype, notes, plugin)


def prepare(study: Study, registry: Registry) -> Plan:
    """Resolve and check everything the study names; raises LesionbenchError on the first problem."""
    check_device(study.device)
    perturbations = resolve_perturbations(study, registry)
    source = registry.get("datasets", study.dataset.name)
    with blame(registry.owner("datasets", study.dataset.name), f"loading dataset {study.dataset.name!r}"):
        raw = source.load(study.dataset.path, study.dataset.split)
    if len(raw) == 0:
        raise LesionbenchError(f"dataset {study.dataset.name!r} is empty")
    wanted = study.dataset.n_images
    if wanted is not None and wanted > len(raw) and wanted != DatasetSpec().n_images:  # the default is capped
        raise LesionbenchError(
            f"n_images {wanted} is more than the {len(raw)} images of dataset "
            f"{study.dataset.name!r} (split {study.dataset.split!r}); ask for at most {len(raw)}"
        )
    indices = stratified_subset(raw.labels, wanted, study.dataset.subset_seed)  # not study.seed
    calibration = calibration_subset(raw.labels, indices, study) if study.bn_recalibrate else None
    sources = {k: c.obj for k, c in registry.contributions("models").items()}
    models = []
    seen = set()
    max_label = int(raw.labels[indices].max())
    for spec in study.models:
        if spec.ref in seen:
            raise LesionbenchError(f"model {spec.ref!r} appears twice in the study")
        seen.add(spec.ref)
        plugin = registry.owner("models", resolve_source(spec, sources))
        with torch.random.fork_rng(devices=[]), blame(plugin, f"building model {spec.ref!r}"):
            torch.manual_seed(
                cell_seed(study.seed, spec.ref, "", "init", 0.0, 0)
            )  # weights not from a file: the seed's
            loaded = create_model(spec, sources)
        models.append(prepare_model(loaded, study, perturbations, raw, max_label, registry, plugin))
    for name, (p, _levels) in perturbations.items():
        if not any(m.targets_of(name) for m in models):
            raise LesionbenchError(f"perturbation {name!r} finds nothing to perturb in any model of the study")
        with blame(registry.owner("perturbations", name), f"checking the layers {name!r} perturbs"):
            for layer in (t for m in models for t in m.targets_of(name)):
                p.check_layer(layer)  # a plugin's own precondition (initial weights known…), before anything runs
        for m in models:
            check_by_forward(m, name, p, registry.owner("perturbations", name))
    return Plan(study, perturbations, raw, indices, models, calibration)


def calibration_subset(labels: np.ndarray, eval_indices: np.ndarray, study: Study) -> np.ndarray:
    """A seeded, class-stratified subset disjoint from the evaluation images, for BatchNorm statistics."""
    rest = np.setdiff1d(np.arange(len(labels)), eval_indices)
    if len(rest) < study.calibration_images:
        raise LesionbenchError(
            f"bn_recalibrate needs {study.calibration_images} images besides the {len(eval_indices)} evaluated, "
            f"but the dataset has only {len(rest)} more; lower calibration_images or dataset.n_images"
        )
    return rest[stratified_subset(labels[rest], study.calibration_images, study.dataset.subset_seed + 1)]


def _with_initial(layers: list[Layer], loaded: LoadedModel) -> list[Layer]:
    """Attach each layer's tensors at initialisation, when the model knows them."""
    if loaded.initial_state is None:
        return layers
    state = loaded.initial_state()
    out = []
    for layer in layers:
        prefix = f"{layer.name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        out.append(replace(layer, initial=own or None))
    return out
