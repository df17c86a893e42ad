"""Walks a study: validate everything, then model → layers → perturbation → level × draw → row.

Everything that can be checked before the first evaluation (names, levels, data path, weights,
layers, label range) is checked before the run directory is created, so bad input leaves nothing
behind. Each cell perturbs one layer in place, evaluates, restores, and appends one row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmark.data import EvalSet, EvalSetCache, RawDataset, stratified_subset
from benchmark.errors import LesionbenchError
from benchmark.engine import create_engine
from benchmark.evaluate import EvalResult, resolve_device
from benchmark.layers import NORMS, Layer, discover_layers, select_layers
from benchmark.models import LoadedModel, create_model
from benchmark.perturbation import (
    Perturbation, Snapshot, cell_seed, check_levels, generator_for, level_axis, model_checksum, nonfinite_count,
    perturbed,
)  # fmt: skip
from benchmark.registry import Registry
from benchmark.store import CLEAN, NONFINITE, RunDir, cell_key
from benchmark.study import Study

log = logging.getLogger("lesionbench")


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
    loaded: LoadedModel
    layers: list[Layer]
    targets: dict[str, list[Layer]]  # perturbations with a layer axis of their own (e.g. stages)

    def targets_of(self, perturbation: str) -> list[Layer]:
        return self.targets.get(perturbation, self.layers)


@dataclass
class Plan:
    """A validated study: resolved plugins, data, models and the cells to evaluate."""

    study: Study
    perturbations: dict[str, tuple[Perturbation, tuple[float, ...]]]
    raw: RawDataset
    indices: object
    models: list[PreparedModel]
    calibration: object = None  # indices of the BatchNorm calibration subset (bn_recalibrate)

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
            same_every_draw = level == perturbation.identity_level or getattr(perturbation, "deterministic", False)
            draws = 1 if same_every_draw else self.study.draws
            out.extend(Cell(layer, perturbation, level, d) for d in range(draws))
        return out

    def cells(self, prepared: PreparedModel) -> list[Cell]:
        return [c for b in self.blocks(prepared) for c in self.block_cells(prepared, b)]

    def total(self) -> int:
        return sum(len(self.cells(m)) + 1 for m in self.models)

    def model(self, name: str) -> PreparedModel:
        return next(m for m in self.models if m.loaded.name == name)

    def label(self, name: str, cell: Cell) -> str:
        return f"{name} · {cell.layer.display} · {self.row_name(cell.perturbation)} {cell.level:g} #{cell.draw}"

    def key(self, name: str, cell: Cell | None = None):
        """The results key of a model's cell (of its clean row when ``cell`` is None)."""
        if cell is None:
            return cell_key(name, "", CLEAN, 0.0, 0)
        return cell_key(name, cell.layer.display, self.row_name(cell.perturbation), cell.level, cell.draw)

    def row_name(self, perturbation: Perturbation) -> str:
        """The perturbation column of a row: recalibrated runs are a condition of their own."""
        return perturbation.name + (BN_SUFFIX if self.study.bn_recalibrate else "")


BN_SUFFIX = "+bn_recalibrate"


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


def prepare(study: Study, registry: Registry) -> Plan:
    """Resolve and check everything the study names; raises LesionbenchError on the first problem."""
    check_device(study.device)
    perturbations = {}
    for name in study.perturbations:
        p = registry.get("perturbations", name)
        levels = check_levels(p, study.levels.get(name, p.default_levels))
        for level in levels if hasattr(p, "check_level") else ():
            p.check_level(level)  # a plugin's own rule (whole bits…), before anything runs
        perturbations[name] = (p, levels)
    unknown_levels = set(study.levels) - set(study.perturbations)
    if unknown_levels:
        raise LesionbenchError(f"levels given for perturbations not in the study: {', '.join(sorted(unknown_levels))}")
    source = registry.get("datasets", study.dataset.name)
    raw = source.load(study.dataset.path, study.dataset.split)
    if len(raw) == 0:
        raise LesionbenchError(f"dataset {study.dataset.name!r} is empty")
    indices = stratified_subset(raw.labels, study.dataset.n_images, study.seed)
    calibration = calibration_subset(raw.labels, indices, study) if study.bn_recalibrate else None
    sources = {k: c.obj for k, c in registry.contributions("models").items()}
    models = []
    seen = set()
    for spec in study.models:
        if spec.ref in seen:
            raise LesionbenchError(f"model {spec.ref!r} appears twice in the study")
        seen.add(spec.ref)
        with torch.random.fork_rng(devices=[]):  # weights not loaded from a file depend only on the study seed
            torch.manual_seed(cell_seed(study.seed, spec.ref, "", "init", 0.0, 0))
            loaded = create_model(spec, sources)
        max_label = int(raw.labels[indices].max())
        if max_label >= loaded.num_classes:
            raise LesionbenchError(
                f"dataset {raw.name!r} has label {max_label} but model {spec.ref!r} has only "
                f"{loaded.num_classes} classes"
            )
        example = torch.zeros(1, *loaded.input_size)
        layers = select_layers(discover_layers(loaded.module, example, loaded.aliases), study.layers)
        if not layers:
            raise LesionbenchError(f"model {spec.ref!r} has no Conv or Linear layer to perturb")
        layers = _with_initial(layers, loaded)
        targets = {}
        for name, (p, _levels) in perturbations.items():
            if hasattr(p, "targets"):  # e.g. residual stages: a model without any has no such blocks
                targets[name] = list(p.targets(loaded.module, layers))
        models.append(PreparedModel(loaded, layers, targets))
    for name, (p, _levels) in perturbations.items():
        if not any(m.targets_of(name) for m in models):
            raise LesionbenchError(f"perturbation {name!r} finds nothing to perturb in any model of the study")
        for layer in (t for m in models for t in m.targets_of(name)) if hasattr(p, "check_layer") else ():
            p.check_layer(layer)  # a plugin's own precondition (initial weights known…), before anything runs
    return Plan(study, perturbations, raw, indices, models, calibration)


def calibration_subset(labels, eval_indices, study: Study):
    """A seeded, class-stratified subset disjoint from the evaluation images, for BatchNorm statistics."""
    rest = np.setdiff1d(np.arange(len(labels)), eval_indices)
    if len(rest) < study.calibration_images:
        raise LesionbenchError(
            f"bn_recalibrate needs {study.calibration_images} images besides the {len(eval_indices)} evaluated, "
            f"but the dataset has only {len(rest)} more; lower calibration_images or dataset.n_images"
        )
    return rest[stratified_subset(labels[rest], study.calibration_images, study.seed + 1)]


def _with_initial(layers: list[Layer], loaded: LoadedModel) -> list[Layer]:
    """Attach each layer's tensors at initialisation, when the model knows them."""
    if loaded.initial_state is None:
        return layers
    state = loaded.initial_state()
    out = []
    for layer in layers:
        prefix = f"{layer.name}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        out.append(replace(layer, initial=own or None))
    return out


def _row(plan: Plan, model: str, cell: Cell | None, seed: int | None, result: EvalResult | None,
         error: str = "", nonfinite: int | None = None) -> dict:  # fmt: skip
    row = {
        "model": model,
        "dataset": plan.study.dataset.name,
        "layer": cell.layer.display if cell else "",
        "layer_index": cell.layer.index if cell else -1,
        "relative_depth": cell.layer.relative_depth if cell else float("nan"),
        "perturbation": plan.row_name(cell.perturbation) if cell else CLEAN,
        "level": float(cell.level) if cell else 0.0,
        "draw": cell.draw if cell else 0,
        "seed": seed if seed is not None else plan.study.seed,
        "num_classes": plan.raw.num_classes,
        "error": error,
        "nonfinite_weights": nonfinite if nonfinite is not None else (0 if cell else None),
        "level_axis": level_axis(cell.perturbation) if cell else "linear",
    }
    if result is not None:
        row.update(
            top1=result.top1, top5=result.top5, loss=result.loss, n_images=result.n_images,
            seconds=result.seconds, images_per_s=result.images_per_s, device=result.device,
        )  # fmt: skip
    return row


class ModelRunner:
    """One model on one device: its evaluation set, engine and clean result; evaluates blocks.

    Both executors use it: the local one in-process, the Ray one inside each worker.
    """

    def __init__(self, plan: Plan, prepared: PreparedModel, eval_set: EvalSet, calibration: EvalSet | None = None,
                 debug: bool = False, note: Callable[[str], None] = lambda _t: None):  # fmt: skip
        study = plan.study
        self.plan, self.prepared, self.debug = plan, prepared, debug
        self.name = prepared.loaded.name
        self.device = resolve_device(study.device)
        if eval_set.skipped:
            log.warning("%s: %d unreadable images skipped", self.name, eval_set.skipped)
            note(f"{self.name}: {eval_set.skipped} unreadable images skipped; evaluated on {len(eval_set)}")
        images = eval_set.images
        module = prepared.loaded.module.to(self.device)
        if study.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
            module = module.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            images = images.pin_memory()
        self.module = module
        self.calibration = calibration.images if calibration is not None else None
        example = torch.zeros(1, *prepared.loaded.input_size, device=self.device)
        self.order = forward_order(module, example) if calibration is not None else {}  # for bn_recalibrate only
        self.reference = model_checksum(module) if debug else None
        self.engine = create_engine(study.engine, module, images, eval_set.labels, study.batch_size, self.device,
                                    study.autocast)  # fmt: skip
        self.clean = self.engine.full()

    def clean_row(self) -> dict:
        return _row(self.plan, self.name, None, None, self.clean)

    def block_rows(self, block: Block, done: set = frozenset()) -> Iterator[tuple[dict | None, str]]:
        """Evaluate a block's cells not in ``done``: yields (row, label), row None for a cell done earlier.

        With the fast engine, the draws and levels of a block are perturbed one after another,
        their damaged tensors copied, and evaluated together in batched passes (see
        :class:`benchmark.engine.LayerEval`); rows come out once their pass is done.
        """
        cells = self.plan.block_cells(self.prepared, block)
        if all(self.key(c) in done for c in cells):
            for c in cells:
                yield None, self.plan.label(self.name, c)
            return
        layer = cells[0].layer
        saved = Snapshot(layer, self._norms_after(layer) if self.calibration is not None else ())
        with self.engine.for_layer(layer) as run_eval:
            batchable = (
                run_eval.many is not None and self.calibration is None
                and (self.plan.study.batch_draws if self.plan.study.batch_draws is not None else self.device.type == "cuda")
                and sum(not c.is_identity and self.key(c) not in done for c in cells) > 1
            )  # fmt: skip
            pending: list[tuple[Cell, int, dict[str, torch.Tensor], int]] = []
            for cell in cells:
                label = self.plan.label(self.name, cell)
                if self.key(cell) in done:
                    yield None, label
                    continue
                if not batchable or cell.is_identity:
                    yield self._cell_row(cell, run_eval, saved), label
                else:
                    captured = self._capture(cell, saved)
                    if captured is None:  # hooks, or the plugin failed: this cell alone, the rest one by one too
                        batchable = False
                        yield from self._flush(pending, run_eval, saved)
                        yield self._cell_row(cell, run_eval, saved), label
                        continue
                    pending.append(captured)
                    if len(pending) >= run_eval.capacity(sum(t.numel() * t.element_size() for t in captured[2].values())):
                        yield from self._flush(pending, run_eval, saved)
                self._check_restored(label)
            yield from self._flush(pending, run_eval, saved)

    def _capture(self, cell: Cell, saved: Snapshot) -> tuple[Cell, int, dict[str, torch.Tensor], int] | None:
        """Apply one cell's perturbation, copy the layer's damaged tensors, restore; None if not possible."""
        seed = self._seed(cell)
        tensors = _named_tensors(cell.layer)
        try:
            with perturbed(cell.layer, cell.perturbation, cell.level, generator_for(seed), saved=saved) as hooked:
                if hooked:
                    return None
                nonfinite = nonfinite_count(cell.layer)
                copies = {k: t.detach().clone() for k, t in _named_tensors(cell.layer).items()}
        except (LesionbenchError, KeyboardInterrupt):
            raise
        except Exception:  # recorded as the cell's error by the one-at-a-time path
            return None
        if copies.keys() != tensors.keys():
            return None
        return cell, seed, copies, nonfinite

    def _flush(self, pending: list, run_eval, saved: Snapshot) -> Iterator[tuple[dict, str]]:
        """Evaluate the captured cells in one batched pass (one by one if the pass fails)."""
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        current = _named_tensors(batch[0][0].layer)  # restored: the clean tensors
        changed = [k for k, t in current.items() if any(not torch.equal(c[k], t) for _c, _s, c, _n in batch)]
        keys = changed or [next(iter(current))]  # vmap needs one batched input even if nothing changed
        try:
            results = run_eval.many([{k: copies[k] for k in keys} for _cell, _seed, copies, _n in batch])
        except (LesionbenchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # an op vmap cannot batch: the cells are evaluated one at a time
            self.engine.notes.append(f"{batch[0][0].layer.name}: draws evaluated one at a time ({type(exc).__name__})")
            for cell, *_rest in batch:
                yield self._cell_row(cell, run_eval, saved), self.plan.label(self.name, cell)
            return
        for (cell, seed, _copies, nonfinite), result in zip(batch, results):
            error = NONFINITE if not math.isfinite(result.loss) else ""
            yield _row(self.plan, self.name, cell, seed, result, error, nonfinite), self.plan.label(self.name, cell)

    def _check_restored(self, label: str) -> None:
        if self.debug and model_checksum(self.module) != self.reference:
            raise LesionbenchError(f"model {self.name!r} was not restored exactly after {label}")

    def _seed(self, cell: Cell) -> int:
        return cell_seed(self.plan.study.seed, self.name, cell.layer.name, cell.perturbation.name, cell.level, cell.draw)

    def key(self, cell: Cell):
        return self.plan.key(self.name, cell)

    def notes(self) -> list[str]:
        return [f"{self.name}: {n}" for n in getattr(self.engine, "notes", [])]

    def _cell_row(self, cell: Cell, run_eval: Callable[[], EvalResult], saved: Snapshot) -> dict:
        """Perturb, (recalibrate,) evaluate, restore: one row."""
        plan = self.plan
        seed = self._seed(cell)
        if cell.is_identity:
            return _row(plan, self.name, cell, seed, self.clean)
        norms = saved.also  # the BatchNorms to re-estimate (bn_recalibrate), found once per block
        error, result, nonfinite = "", None, None
        try:
            with perturbed(cell.layer, cell.perturbation, cell.level, generator_for(seed), also=norms, saved=saved):
                nonfinite = nonfinite_count(cell.layer)
                if norms:
                    recalibrate(self.module, norms, self.calibration, plan.study.batch_size, self.device)
                result = run_eval()
        except (LesionbenchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a faulty plugin fails its own cell, not the study
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("%s failed: %s", plan.label(self.name, cell), error)
        if result is not None and not math.isfinite(result.loss):
            error = error or NONFINITE
        return _row(plan, self.name, cell, seed, result, error, nonfinite)

    def _norms_after(self, layer: Layer) -> list[nn.Module]:
        """The BatchNorm layers that run after ``layer`` starts: the ones whose inputs it changes."""
        start = self.order.get(layer.module, -1)
        return [m for m, i in self.order.items() if isinstance(m, NORMS) and i >= start]

    def close(self) -> None:
        self.engine.close()
        self.prepared.loaded.module.to("cpu")


def _named_tensors(layer: Layer) -> dict[str, torch.Tensor]:
    """The layer's (and its norm's) parameters and buffers under their names in the model."""
    out = {}
    for prefix, module in [(layer.name, layer.module), (layer.norm_name, layer.norm)]:
        if module is not None and prefix is not None:
            for kind in (module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
                out.update({f"{prefix}.{k}": t for k, t in kind})
    return out


def forward_order(module: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """Each submodule's position in the order modules start running, from one forward pass."""
    order: dict[nn.Module, int] = {}

    def seen(m: nn.Module, _inputs) -> None:  # a pre-hook that returns something replaces the input
        order.setdefault(m, len(order))

    hooks = [m.register_forward_pre_hook(seen) for m in module.modules()]
    try:
        with torch.inference_mode():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    return order


def recalibrate(module: nn.Module, norms: list[nn.Module], images: torch.Tensor, batch_size: int,
                device: torch.device) -> None:  # fmt: skip
    """Re-estimate the running statistics of ``norms`` on ``images`` (a cumulative average), the
    rest of the network staying in eval mode; the caller restores the old statistics."""
    saved = [(m, m.momentum) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for b in range(0, len(images), batch_size):
                module(images[b : b + batch_size].to(device, non_blocking=True))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()


def eval_sets(plan: Plan, cache: EvalSetCache, prepared: PreparedModel) -> tuple[EvalSet, EvalSet | None]:
    """The model's evaluation set (and calibration set), decoded once per preprocessing."""
    loaded = prepared.loaded
    eval_set = cache.get(plan.raw, plan.indices, loaded.preprocess, loaded.preprocess_key)
    calibration = None
    if plan.calibration is not None:
        calibration = cache.get(plan.raw, plan.calibration, loaded.preprocess, loaded.preprocess_key + "|calibration")
    return eval_set, calibration


def execute(
    plan: Plan,
    run: RunDir,
    progress: Callable[[str], None] | None = None,
    debug: bool = False,
) -> None:
    """Evaluate every cell of ``plan`` not already in ``run``, appending a row per cell (local executor)."""
    done = run.completed()
    cache = EvalSetCache()
    tick = progress or (lambda _desc: None)
    for prepared in plan.models:
        name = prepared.loaded.name
        clean_key = plan.key(name)
        blocks = plan.blocks(prepared)
        if clean_key in done and all(plan.key(name, c) in done for c in plan.cells(prepared)):
            for _ in range(len(plan.cells(prepared)) + 1):
                tick(f"{name}: done earlier")
            continue
        runner = ModelRunner(plan, prepared, *eval_sets(plan, cache, prepared), debug=debug, note=run.note)
        try:
            if clean_key not in done:
                run.append(runner.clean_row())
            tick(f"{name}: clean")
            for block in blocks:
                for row, label in runner.block_rows(block, done):
                    if row is not None:
                        run.append(row)
                    tick(label)
            for note in runner.notes():
                run.note(note)
        finally:  # cached activations (and spilled files) go, however the run ends
            runner.close()


def run_study(
    study: Study,
    registry: Registry,
    out: Path,
    resume: bool = False,
    progress_factory=None,
    debug: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
) -> RunDir:
    """Prepare (all checks), then create or reopen the run directory, then execute.

    ``executor="ray"`` runs the blocks on a Ray cluster (``ray_address``: None starts a local one,
    ``auto`` joins this node's cluster, ``ray://host:10001`` a remote one); see benchmark/executors.py.
    """
    if executor == "ray":
        from contextlib import nullcontext

        from benchmark import executors

        executors.require_ray()  # before anything else: one line, nothing written
        plan = prepare(executors.driver_study(study), registry)
        if resume:
            RunDir.open_existing(out, study)  # a different study is refused before connecting
        with executors.ray_cluster(ray_address) as cluster:
            worker_study = replace(study, device=cluster.device_for(study))
            executors.probe(cluster, worker_study, registry)  # a plugin missing on workers: nothing written
            run = RunDir.open_existing(out, study) if resume else RunDir.create(out, study)
            with (progress_factory or (lambda _total: nullcontext()))(plan.total()) as tick:
                executors.execute_ray(cluster, plan, run, registry, tick, debug, worker_study)
        return run
    if executor != "local":
        raise LesionbenchError(f"unknown executor {executor!r} (local or ray)")
    if ray_address is not None:
        raise LesionbenchError("--ray-address is for --executor ray")
    plan = prepare(study, registry)
    run = RunDir.open_existing(out, study) if resume else RunDir.create(out, study)
    if progress_factory is None:
        execute(plan, run, debug=debug)
    else:
        with progress_factory(plan.total()) as tick:
            execute(plan, run, tick, debug=debug)
    return run


def run_from_cli(args, console) -> int:
    """``lesionbench run``: load the study, apply flags, run it with a rich progress bar."""
    from benchmark.progress import rich_progress
    from benchmark.registry import get_registry
    from benchmark.study import load_study, with_overrides

    registry = get_registry()
    presets = {k: c.obj for k, c in registry.contributions("studies").items()}
    if args.resume is not None:
        from benchmark.study import parse_study

        manifest = RunDir.open_existing(args.resume).manifest()
        study = parse_study(_manifest_study(manifest["study"]))
        out = args.resume
    else:
        study = load_study(args.study, presets)
        out = args.out or Path("runs") / study.name
    study = with_overrides(
        study,
        models=args.models, layers=args.layers, perturbations=args.perturbations, levels=args.levels,
        draws=args.draws, n_images=args.n_images, seed=args.seed, data=args.data, device=args.device,
        batch_size=args.batch_size, engine=args.engine, autocast=args.autocast, channels_last=args.channels_last,
        bn_recalibrate=args.bn_recalibrate,
    )  # fmt: skip
    run = run_study(study, registry, out, resume=args.resume is not None,
                    progress_factory=lambda total: rich_progress(console, total), debug=args.debug,
                    executor=getattr(args, "executor", "local"), ray_address=getattr(args, "ray_address", None))  # fmt: skip
    from benchmark.publish import publish
    from benchmark.report import print_summary

    print_summary(run.frame(), study, console)
    board = publish([run.results_path], run.path / "LEADERBOARD.md", title=f"lesionbench: {study.name}")
    console.print(f"results: {run.results_path}\nleaderboard: {board}\nplots: {run.path / 'plots'}")
    return 0


def _manifest_study(d: dict) -> dict:
    """The study mapping stored in a manifest, back in study-file form."""
    d = {k: v for k, v in d.items() if v is not None}  # unset options (batch_draws: automatic)
    d["models"] = [{k: v for k, v in m.items() if v not in (None, {})} for m in d["models"]]
    d["dataset"] = {k: v for k, v in d["dataset"].items() if v is not None}
    d["layers"] = list(d["layers"])
    d["perturbations"] = list(d["perturbations"])
    return d
