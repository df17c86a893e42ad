"""The study: what to run, parsed and validated from TOML, and presets contributed by plugins.

A study names models, a dataset and its subset, layers, perturbations with their levels, draws,
seed and device. Everything that changes the numbers is part of its fingerprint, which a run
directory records so that ``--resume`` refuses to mix two different studies.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmark.errors import LesionbenchError
from benchmark.models import ModelSpec

DEFAULT_PERTURBATIONS = ("synapse_knockout", "node_knockout", "weight_noise")


@dataclass(frozen=True)
class DatasetSpec:
    name: str = "fashion_mnist"
    path: str | None = None
    split: str = "test"
    n_images: int | None = 1000


@dataclass(frozen=True)
class Study:
    name: str
    models: tuple[ModelSpec, ...]
    dataset: DatasetSpec = DatasetSpec()
    perturbations: tuple[str, ...] = DEFAULT_PERTURBATIONS
    levels: dict[str, tuple[float, ...]] = field(default_factory=dict)  # overrides of default levels
    layers: tuple[str, ...] = ()  # empty: every Conv/Linear layer
    draws: int = 5
    seed: int = 0
    device: str = "auto"
    batch_size: int = 256
    metric: str = "top1"  # what scores are computed from: top1 or top5
    engine: str = "fast"  # "fast" (only what a perturbation changes) or "naive" (full passes)
    # Fast engine: several draws of a layer in one vmapped pass. None = on CUDA only: on the CPU the
    # batched (grouped) convolutions measured slower than one pass per draw.
    batch_draws: bool | None = None
    autocast: bool = False  # mixed precision (float16 on CUDA, bfloat16 on CPU)
    channels_last: bool = False  # NHWC memory layout for models and images
    bn_recalibrate: bool = False  # re-estimate BatchNorm statistics after each perturbation
    calibration_images: int = 200  # the separate subset they are re-estimated on
    description: str = ""

    def fingerprint(self) -> str:
        """Hash of everything that determines the numbers (not name, device or batch size)."""
        payload = {
            "models": [_model_fingerprint(m) for m in self.models],
            "dataset": asdict(self.dataset),
            "perturbations": list(self.perturbations),
            "levels": {k: list(v) for k, v in sorted(self.levels.items())},
            "layers": list(self.layers),
            "draws": self.draws,
            "seed": self.seed,
        }
        # Options that change the arithmetic join the fingerprint only when on, so that runs made
        # before they existed keep their fingerprint.
        payload |= {k: True for k in ("autocast", "channels_last") if getattr(self, k)}
        if self.bn_recalibrate:
            payload["bn_recalibrate"] = self.calibration_images
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = [asdict(m) | {"options": dict(m.options)} for m in self.models]
        d["levels"] = {k: list(v) for k, v in self.levels.items()}
        return d


def _model_fingerprint(m: ModelSpec) -> dict:
    d = asdict(m) | {"options": dict(m.options)}
    if d["init_checkpoint"] is None:  # absent from fingerprints made before the field existed
        del d["init_checkpoint"]
    return d


@dataclass(frozen=True)
class StudyPreset:
    """A named study that ``lesionbench run NAME`` accepts; ``toml`` is its text."""

    name: str
    description: str
    toml: str


_TOP_KEYS = {
    "name": str,
    "description": str,
    "models": list,
    "dataset": dict,
    "perturbations": list,
    "levels": dict,
    "layers": list,
    "draws": int,
    "seed": int,
    "device": str,
    "batch_size": int,
    "metric": str,
    "engine": str,
    "batch_draws": bool,
    "autocast": bool,
    "channels_last": bool,
    "bn_recalibrate": bool,
    "calibration_images": int,
}
_DATASET_KEYS = {"name": str, "path": str, "split": str, "n_images": int}
_MODEL_KEYS = {"ref": str, "weights": str, "checkpoint": str, "options": dict, "init_checkpoint": str}


def _check_table(table: dict, schema: dict, where: str) -> None:
    for key, value in table.items():
        if key not in schema:
            raise LesionbenchError(f"unknown key {where}{key!r} in study (valid: {', '.join(schema)})")
        expected = schema[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            raise LesionbenchError(
                f"study key {where}{key!r} must be {expected.__name__}, got {type(value).__name__} {value!r}"
            )


def _model_spec(item: Any, i: int) -> ModelSpec:
    if isinstance(item, str):
        return ModelSpec(item)
    if isinstance(item, dict):
        _check_table(item, _MODEL_KEYS, f"models[{i}].")
        if "ref" not in item:
            raise LesionbenchError(f"study key models[{i}] needs a 'ref' (e.g. 'timm:resnet18')")
        return ModelSpec(item["ref"], item.get("weights"), item.get("checkpoint"), dict(item.get("options", {})),
                         item.get("init_checkpoint"))  # fmt: skip
    raise LesionbenchError(f"study key models[{i}] must be a string or a table, got {type(item).__name__}")


def parse_study(data: dict[str, Any], default_name: str = "study", base_dir: Path | None = None) -> Study:
    """Validate a study mapping (from TOML); the first bad key is named in the error."""
    _check_table(data, _TOP_KEYS, "")
    if not data.get("models"):
        raise LesionbenchError("study needs at least one entry in 'models'")
    models = tuple(_model_spec(m, i) for i, m in enumerate(data["models"]))
    if base_dir is not None:  # checkpoints relative to the study file
        def relative(p: str | None) -> str | None:
            return str(base_dir / p) if p and not Path(p).is_absolute() else p

        models = tuple(replace(m, checkpoint=relative(m.checkpoint), init_checkpoint=relative(m.init_checkpoint))
                       for m in models)  # fmt: skip
    dataset_table = dict(data.get("dataset", {}))
    _check_table(dataset_table, _DATASET_KEYS, "dataset.")
    dataset = DatasetSpec(**dataset_table)
    for key in ("perturbations", "layers"):
        for i, v in enumerate(data.get(key, [])):
            if not isinstance(v, str):
                raise LesionbenchError(f"study key {key}[{i}] must be str, got {type(v).__name__} {v!r}")
    levels = {}
    for pert, values in data.get("levels", {}).items():
        if not isinstance(values, list) or not values:
            raise LesionbenchError(f"study key levels.{pert!r} must be a non-empty list of numbers")
        levels[pert] = tuple(values)
    study = Study(
        name=data.get("name", default_name),
        description=data.get("description", ""),
        models=models,
        dataset=dataset,
        perturbations=tuple(data.get("perturbations", DEFAULT_PERTURBATIONS)),
        levels=levels,
        layers=tuple(data.get("layers", ())),
        draws=data.get("draws", 5),
        seed=data.get("seed", 0),
        device=data.get("device", "auto"),
        batch_size=data.get("batch_size", 256),
        metric=data.get("metric", "top1"),
        engine=data.get("engine", "fast"),
        batch_draws=data.get("batch_draws"),
        autocast=data.get("autocast", False),
        channels_last=data.get("channels_last", False),
        bn_recalibrate=data.get("bn_recalibrate", False),
        calibration_images=data.get("calibration_images", 200),
    )
    validate_scalars(study)
    return study


def validate_scalars(study: Study) -> None:
    """Checks that need no plugin: counts positive, metric known."""
    if study.draws < 1:
        raise LesionbenchError(f"study key 'draws' must be at least 1, got {study.draws}")
    if study.seed < 0:
        raise LesionbenchError(f"study key 'seed' must be a non-negative integer, got {study.seed}")
    if study.batch_size < 1:
        raise LesionbenchError(f"study key 'batch_size' must be at least 1, got {study.batch_size}")
    if study.dataset.n_images is not None and study.dataset.n_images < 1:
        raise LesionbenchError(f"study key 'dataset.n_images' must be at least 1, got {study.dataset.n_images}")
    if study.metric not in ("top1", "top5"):
        raise LesionbenchError(f"study key 'metric' must be 'top1' or 'top5', got {study.metric!r}")
    if study.engine not in ("fast", "naive"):
        raise LesionbenchError(f"study key 'engine' must be 'fast' or 'naive', got {study.engine!r}")
    if study.calibration_images < 1:
        raise LesionbenchError(f"study key 'calibration_images' must be at least 1, got {study.calibration_images}")
    if not study.perturbations:
        raise LesionbenchError("study needs at least one entry in 'perturbations'")


def parse_toml(text: str, default_name: str = "study", base_dir: Path | None = None) -> Study:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LesionbenchError(f"study is not valid TOML: {exc}") from None
    return parse_study(data, default_name, base_dir)


def load_study(name_or_path: str, presets: dict[str, StudyPreset]) -> Study:
    """A preset by name, or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise LesionbenchError(f"study file {name_or_path!r} does not exist")
        return parse_toml(path.read_text(), default_name=path.stem, base_dir=path.parent)
    if name_or_path not in presets:
        from benchmark.errors import unknown_name

        raise unknown_name("study", name_or_path, presets)
    return parse_toml(presets[name_or_path].toml, default_name=name_or_path)


def with_overrides(study: Study, **overrides: Any) -> Study:
    """Apply command-line overrides (None means: keep the study's value)."""
    changes: dict[str, Any] = {}
    dataset_changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "models":
            changes["models"] = tuple(ModelSpec(m) for m in value)
        elif key == "data":
            dataset_changes["path"] = value
        elif key == "n_images":
            dataset_changes["n_images"] = value
        elif key == "levels":
            changes["levels"] = {p: tuple(value) for p in overrides.get("perturbations") or study.perturbations}
        elif key in ("layers", "perturbations"):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    if dataset_changes:
        changes["dataset"] = replace(study.dataset, **dataset_changes)
    out = replace(study, **changes)
    validate_scalars(out)
    return out
