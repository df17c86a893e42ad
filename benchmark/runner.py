"""Walks a study: validate everything, then model → layers → perturbation → level × draw → row.

Everything that can be checked before the first evaluation (names, levels, data path, weights,
layers, label range) is checked before the run directory is created, so bad input leaves nothing
behind. Each cell perturbs one layer in place, evaluates, restores, and appends one row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmark.data import EvalSetCache, RawDataset, stratified_subset
from benchmark.errors import LesionbenchError
from benchmark.engine import create_engine
from benchmark.evaluate import EvalResult, resolve_device
from benchmark.layers import Layer, discover_layers, select_layers
from benchmark.models import LoadedModel, create_model
from benchmark.perturbation import Perturbation, cell_seed, check_levels, generator_for, model_checksum, perturbed
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


@dataclass
class PreparedModel:
    loaded: LoadedModel
    layers: list[Layer]


@dataclass
class Plan:
    """A validated study: resolved plugins, data, models and the cells to evaluate."""

    study: Study
    perturbations: dict[str, tuple[Perturbation, tuple[float, ...]]]
    raw: RawDataset
    indices: object
    models: list[PreparedModel]

    def cells(self, prepared: PreparedModel) -> list[Cell]:
        """All cells of one model; the identity level is evaluated once (draw 0), as the clean model."""
        out = []
        for layer in prepared.layers:
            for perturbation, levels in self.perturbations.values():
                for level in levels:
                    draws = 1 if level == perturbation.identity_level else self.study.draws
                    out.extend(Cell(layer, perturbation, level, d) for d in range(draws))
        return out

    def total(self) -> int:
        return sum(len(self.cells(m)) + 1 for m in self.models)


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
        perturbations[name] = (p, levels)
    unknown_levels = set(study.levels) - set(study.perturbations)
    if unknown_levels:
        raise LesionbenchError(f"levels given for perturbations not in the study: {', '.join(sorted(unknown_levels))}")
    source = registry.get("datasets", study.dataset.name)
    raw = source.load(study.dataset.path, study.dataset.split)
    if len(raw) == 0:
        raise LesionbenchError(f"dataset {study.dataset.name!r} is empty")
    indices = stratified_subset(raw.labels, study.dataset.n_images, study.seed)
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
        models.append(PreparedModel(loaded, layers))
    return Plan(study, perturbations, raw, indices, models)


def _row(plan: Plan, model: str, cell: Cell | None, seed: int | None, result: EvalResult | None, error: str = "") -> dict:
    row = {
        "model": model,
        "dataset": plan.study.dataset.name,
        "layer": cell.layer.display if cell else "",
        "layer_index": cell.layer.index if cell else -1,
        "relative_depth": cell.layer.relative_depth if cell else float("nan"),
        "perturbation": cell.perturbation.name if cell else CLEAN,
        "level": float(cell.level) if cell else 0.0,
        "draw": cell.draw if cell else 0,
        "seed": seed if seed is not None else plan.study.seed,
        "num_classes": plan.raw.num_classes,
        "error": error,
    }
    if result is not None:
        row.update(
            top1=result.top1, top5=result.top5, loss=result.loss, n_images=result.n_images,
            seconds=result.seconds, images_per_s=result.images_per_s, device=result.device,
        )  # fmt: skip
    return row


def execute(
    plan: Plan,
    run: RunDir,
    progress: Callable[[str], None] | None = None,
    debug: bool = False,
) -> None:
    """Evaluate every cell of ``plan`` not already in ``run``, appending a row per cell."""
    study = plan.study
    device = resolve_device(study.device)
    done = run.completed()
    cache = EvalSetCache()
    tick = progress or (lambda _desc: None)
    for prepared in plan.models:
        loaded = prepared.loaded
        name = loaded.name
        cells = plan.cells(prepared)
        todo = [c for c in cells if _key(name, c) not in done]
        clean_key = cell_key(name, "", CLEAN, 0.0, 0)
        if not todo and clean_key in done:
            for _ in range(len(cells) + 1):
                tick(f"{name}: done earlier")
            continue
        eval_set = cache.get(plan.raw, plan.indices, loaded.preprocess, loaded.preprocess_key)
        if eval_set.skipped:
            log.warning("%s: %d unreadable images skipped", name, eval_set.skipped)
            run.note(f"{name}: {eval_set.skipped} unreadable images skipped; evaluated on {len(eval_set)}")
        images = eval_set.images
        module = loaded.module.to(device)
        if study.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
            module = module.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            images = images.pin_memory()
        reference = model_checksum(module) if debug else None
        engine = create_engine(study.engine, module, images, eval_set.labels, study.batch_size, device, study.autocast)

        clean = engine.full()
        if clean_key not in done:
            run.append(_row(plan, name, None, None, clean))
        tick(f"{name}: clean")
        for layer in prepared.layers:
            mine = [c for c in cells if c.layer is layer]
            if all(_key(name, c) in done for c in mine):
                for c in mine:
                    tick(f"{name} · {layer.display}: done earlier")
                continue
            with engine.for_layer(layer) as run_eval:
                for cell in mine:
                    _run_cell(plan, run, name, cell, clean, run_eval, done, tick)
                    if debug and model_checksum(module) != reference:
                        raise LesionbenchError(f"model {name!r} was not restored exactly after {cell}")
        for note in getattr(engine, "notes", []):
            run.note(f"{name}: {note}")
        loaded.module.to("cpu")


def _key(model: str, cell: Cell):
    return cell_key(model, cell.layer.display, cell.perturbation.name, cell.level, cell.draw)


def _run_cell(plan: Plan, run: RunDir, name: str, cell: Cell, clean: EvalResult, run_eval, done, tick) -> None:
    """Perturb, evaluate, restore and record one cell (skipped when an earlier run recorded it)."""
    label = f"{name} · {cell.layer.display} · {cell.perturbation.name} {cell.level:g} #{cell.draw}"
    if _key(name, cell) in done:
        tick(label)
        return
    seed = cell_seed(plan.study.seed, name, cell.layer.name, cell.perturbation.name, cell.level, cell.draw)
    if cell.is_identity:
        run.append(_row(plan, name, cell, seed, clean))
        tick(label)
        return
    error = ""
    result = None
    try:
        with perturbed(cell.layer, cell.perturbation, cell.level, generator_for(seed)):
            result = run_eval()
    except (LesionbenchError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a faulty plugin fails its own cell, not the study
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.warning("%s failed: %s", label, error)
    if result is not None and not math.isfinite(result.loss):
        error = error or NONFINITE
    run.append(_row(plan, name, cell, seed, result, error))
    tick(label)


def run_study(
    study: Study,
    registry: Registry,
    out: Path,
    resume: bool = False,
    progress_factory=None,
    debug: bool = False,
) -> RunDir:
    """Prepare (all checks), then create or reopen the run directory, then execute."""
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
    )  # fmt: skip
    run = run_study(study, registry, out, resume=args.resume is not None,
                    progress_factory=lambda total: rich_progress(console, total), debug=args.debug)  # fmt: skip
    from benchmark.publish import publish
    from benchmark.report import print_summary

    print_summary(run.frame(), study, console)
    board = publish([run.results_path], run.path / "LEADERBOARD.md", title=f"lesionbench: {study.name}")
    console.print(f"results: {run.results_path}\nleaderboard: {board}\nplots: {run.path / 'plots'}")
    return 0


def _manifest_study(d: dict) -> dict:
    """The study mapping stored in a manifest, back in study-file form."""
    d = dict(d)
    d["models"] = [{k: v for k, v in m.items() if v not in (None, {})} for m in d["models"]]
    d["dataset"] = {k: v for k, v in d["dataset"].items() if v is not None}
    d["layers"] = list(d["layers"])
    d["perturbations"] = list(d["perturbations"])
    return d
