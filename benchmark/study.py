"""The study: what to run, as one dataclass from which its TOML schema, checks and flags derive.

A study names models, a dataset and its subset, layers, perturbations with their levels, draws,
seed and device. Each scalar option is declared once, with :func:`option`: its default, its help
text (which the command line shows for its flag), whether it changes the numbers (then it is part
of the plan's fingerprint) and its bounds. TOML keys, their types, the ``--flag`` of each option
and the manifest's copy of the study all come from these declarations.
"""

from __future__ import annotations

import numbers
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lesionbench.errors import LesionbenchError, unknown_name
from lesionbench.model_sources import ModelSpec

DEFAULT_PERTURBATIONS = ("synapse_knockout", "node_knockout", "weight_noise")


def option(default: Any, help: str, *, numbers: bool | str = False, flag: bool = True, minimum: float | None = None,
           choices: tuple[str, ...] | None = None) -> Any:  # fmt: skip
    """A study option. ``numbers``: True when it changes the numbers (always in the fingerprint),
    ``"when_on"`` when only its non-default values do (so runs made before it existed keep their
    fingerprint); ``flag``: the command line gets ``--name``. A dict default is copied per study."""
    meta = dict(help=help, numbers=numbers, flag=flag, minimum=minimum, choices=choices)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DatasetSpec:
    name: str = option("fashion_mnist", "dataset plugin", numbers=True, flag=False)
    path: str | None = option(None, "dataset path (overrides the study's)", numbers=True, flag=False)
    split: str = option("test", "split of the dataset to evaluate on", numbers=True, flag=False)
    n_images: int | None = option(1000, "size of the seeded, class-stratified evaluation subset", numbers=True,
                                  flag=False, minimum=1)  # fmt: skip
    subset_seed: int = option(0, "seed of the evaluation subset (and the BatchNorm calibration subset): its own, "
                              "not the study seed, so a run with another seed evaluates the same images",
                              numbers="when_on", flag=False, minimum=0)  # fmt: skip
    title: str | None = option(None, "what leaderboards call the data (e.g. 'ImageNet (sample)'; default: a known "
                               "dataset's name, else the plugin's)", flag=False)  # fmt: skip


@dataclass(frozen=True)
class Study:
    name: str = option("study", "the study's name (the default run directory is runs/<name>)", flag=False)
    description: str = option("", "what the study is for", flag=False)
    models: tuple[ModelSpec, ...] = option((), "model references", numbers=True, flag=False)
    dataset: DatasetSpec = option(DatasetSpec(), "the dataset", numbers=True, flag=False)
    perturbations: tuple[str, ...] = option(DEFAULT_PERTURBATIONS, "perturbation names", numbers=True, flag=False)
    levels: dict[str, tuple[float, ...]] = option({}, "levels per perturbation (default: each one's own)",
                                                  numbers=True, flag=False)  # fmt: skip
    layers: tuple[str, ...] = option((), "layer names or aliases (empty: every Conv/Linear layer)", numbers=True,
                                     flag=False)  # fmt: skip
    layer_count: int | None = option(None, "study N layers per model at the same relative depths 0, 1/(N-1), …, 1 "
                                     "(each model's nearest layer; instead of 'layers')", numbers="when_on",
                                     minimum=2)  # fmt: skip
    draws: int = option(5, "random draws per layer and level", numbers=True, minimum=1)
    # adaptive draws (off by default): more draws where a level's mean accuracy is still uncertain
    target_ci: float | None = option(None, "adaptive draws: after 'draws' draws, add draws to a layer × level until "
                                     "the 95 percent t-interval of its mean accuracy is narrower than this (e.g. 0.02)",
                                     numbers="when_on", minimum=0)  # fmt: skip
    max_draws: int = option(20, "adaptive draws: at most this many draws per layer × level (with target_ci)",
                            numbers="when_on", minimum=1)  # fmt: skip
    seed: int = option(0, "study seed (cells, random initialisations; the images are dataset.subset_seed's)",
                       numbers=True, minimum=0)  # fmt: skip
    device: str = option("auto", "cpu, cuda, cuda:1 or auto (cuda when available)")
    batch_size: int = option(256, "evaluation batch size", minimum=1)
    metric: str = option("top1", "what scores are computed from", choices=("top1", "top5"))
    engine: str = option("fast", "fast: evaluate only what a perturbation changes; naive: full passes",
                         choices=("fast", "naive"))  # fmt: skip
    # None = on CUDA only: on the CPU the batched (grouped) convolutions measured slower than one pass per draw.
    batch_draws: bool | None = option(None, "evaluate a layer's draws in one vmapped pass (default: on CUDA only)",
                                      flag=False)  # fmt: skip
    autocast: bool = option(False, "mixed precision (float16 on CUDA, bfloat16 on CPU)", numbers="when_on")
    channels_last: bool = option(False, "NHWC memory layout for models and images", numbers="when_on")
    bn_recalibrate: bool = option(False, "re-estimate BatchNorm statistics on a calibration subset after each "
                                  "perturbation", numbers="when_on")  # fmt: skip
    calibration_images: int = option(200, "images of that calibration subset (with bn_recalibrate)", minimum=1)

    def numbers(self) -> dict[str, Any]:
        """Everything in the study that determines the numbers (not name, device or batch size)."""
        payload: dict[str, Any] = {}
        for f in fields(self):
            value, mode = getattr(self, f.name), f.metadata["numbers"]
            if mode is True or (mode == "when_on" and value != default_of(f.name)):
                payload[f.name] = _plain(value)
        # the dataset's own options that do not change the numbers (its title) stay out
        payload["dataset"] = {f.name: _plain(getattr(self.dataset, f.name)) for f in fields(DatasetSpec)
                              if f.metadata["numbers"] is True or (f.metadata["numbers"] == "when_on"
                                                                   and getattr(self.dataset, f.name) != f.default)}  # fmt: skip
        if self.bn_recalibrate:
            payload["calibration_images"] = self.calibration_images
        return payload

    def to_dict(self) -> dict[str, Any]:
        """The study as a TOML-shaped mapping (what a manifest stores; :func:`parse_study` reads it back)."""
        out = {k: _plain(v) for k, v in asdict(self).items() if v is not None}
        out["models"] = [{k: v for k, v in m.items() if v not in (None, {})} for m in out["models"]]
        out["dataset"] = {k: v for k, v in out["dataset"].items() if v is not None}
        return out


def _plain(value: Any) -> Any:
    """JSON/TOML-shaped: tuples as lists, dataclasses as mappings."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class StudyPreset:
    """A named study that ``lesionbench run NAME`` accepts; ``toml`` is its text."""

    name: str
    description: str
    toml: str


# ------------------------------------------------------------------------------------ parsing


def _scalar_type(hint: Any) -> type | None:
    """int/float/str/bool of a field's hint (``X | None`` gives X); None for structured fields."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    found = [a for a in args if a in (int, float, str, bool)]
    return found[0] if len(found) == 1 else None


_HINTS = typing.get_type_hints(Study)
_DATASET_HINTS = typing.get_type_hints(DatasetSpec)
_MODEL_KEYS = {"ref": str, "weights": str, "checkpoint": str, "options": dict, "init_checkpoint": str}


def option_type(name: str) -> type | None:
    """int, float, str or bool: the scalar type of a study option (None for structured ones)."""
    return _scalar_type(_HINTS[name])


def option_fields(cls: type = Study) -> list:
    """The options of ``cls`` with their metadata, in declaration order."""
    return list(fields(cls))


def _check_value(where: str, key: str, value: Any, expected: type) -> None:
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise LesionbenchError(
            f"study key {where}{key!r} must be {expected.__name__}, got {type(value).__name__} {value!r}"
        )


def _check_table(table: dict, schema: dict[str, type], where: str) -> None:
    for key, value in table.items():
        if key not in schema:
            raise LesionbenchError(f"unknown key {where}{key!r} in study (valid: {', '.join(schema)})")
        if value is not None:  # None: not set (a manifest written by an older version)
            _check_value(where, key, value, schema[key])


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


def _string_list(data: dict, key: str) -> tuple[str, ...]:
    values = data[key]
    if not isinstance(values, list):
        raise LesionbenchError(f"study key {key!r} must be a list, got {type(values).__name__} {values!r}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise LesionbenchError(f"study key {key}[{i}] must be str, got {type(v).__name__} {v!r}")
    return tuple(values)


def parse_study(data: dict[str, Any], default_name: str = "study", base_dir: Path | None = None) -> Study:
    """Validate a study mapping (from TOML, a manifest or Python); the first bad key is named."""
    if not isinstance(data, dict):
        raise LesionbenchError(f"a study must be a mapping, got {type(data).__name__}")
    valid = [f.name for f in fields(Study)]
    for key in data:
        if key not in valid:
            raise unknown_name("key", key, valid)
    values: dict[str, Any] = {"name": default_name}
    for f in fields(Study):
        if f.name not in data:
            continue
        value, kind = data[f.name], _scalar_type(_HINTS[f.name])
        if value is None:  # not set (a manifest written by an older version)
            continue
        if kind is not None:
            _check_value("", f.name, value, kind)
            values[f.name] = value
        elif f.name == "models":
            if not isinstance(value, list):
                raise LesionbenchError(f"study key 'models' must be a list, got {type(value).__name__}")
            values["models"] = tuple(_model_spec(m, i) for i, m in enumerate(value))
        elif f.name == "dataset":
            if not isinstance(value, dict):
                raise LesionbenchError(f"study key 'dataset' must be a table, got {type(value).__name__}")
            _check_table(value, {k: _scalar_type(h) for k, h in _DATASET_HINTS.items()}, "dataset.")
            values["dataset"] = DatasetSpec(**{k: v for k, v in value.items() if v is not None})
        elif f.name == "levels":
            if not isinstance(value, dict):
                raise LesionbenchError(f"study key 'levels' must be a table, got {type(value).__name__}")
            levels = {}
            for pert, given in value.items():
                if not isinstance(given, list) or not given:
                    raise LesionbenchError(f"study key levels.{pert!r} must be a non-empty list of numbers")
                levels[pert] = tuple(given)
            values["levels"] = levels
        else:  # perturbations, layers
            values[f.name] = _string_list(data, f.name)
    if not values.get("models"):
        raise LesionbenchError("study needs at least one entry in 'models'")
    study = Study(**values)
    if base_dir is not None:  # checkpoints relative to the study file
        def relative(p: str | None) -> str | None:
            return str(base_dir / p) if p and not Path(p).is_absolute() else p

        models = tuple(replace(m, checkpoint=relative(m.checkpoint), init_checkpoint=relative(m.init_checkpoint))
                       for m in study.models)  # fmt: skip
        study = replace(study, models=models)
    validate_scalars(study)
    return study


def validate_scalars(study: Study) -> None:
    """Checks that need no plugin: bounds and choices declared with each option."""
    for spec, where in ((study, ""), (study.dataset, "dataset.")):
        for f in fields(spec):
            value, meta = getattr(spec, f.name), f.metadata
            if meta.get("minimum") is not None and value is not None and value < meta["minimum"]:
                word = "a non-negative integer" if meta["minimum"] == 0 else f"at least {meta['minimum']}"
                raise LesionbenchError(f"study key '{where}{f.name}' must be {word}, got {value}")
            if meta.get("choices") and value not in meta["choices"]:
                listing = " or ".join(repr(c) for c in meta["choices"])
                raise LesionbenchError(f"study key '{where}{f.name}' must be {listing}, got {value!r}")
    if not study.perturbations:
        raise LesionbenchError("study needs at least one entry in 'perturbations'")
    if study.target_ci is not None and (study.target_ci <= 0 or study.max_draws < study.draws):
        raise LesionbenchError(
            f"adaptive draws need target_ci > 0 and max_draws ≥ draws, got target_ci {study.target_ci}, "
            f"max_draws {study.max_draws}, draws {study.draws}"
        )
    if study.layers and study.layer_count is not None:
        raise LesionbenchError("study gives both 'layers' and 'layer_count': name the layers or count them, not both")


def parse_toml(text: str, default_name: str = "study", base_dir: Path | None = None, source: str | None = None) -> Study:
    """A study from TOML text; ``source`` (a file's path, a preset's name) is named in a syntax error."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LesionbenchError(f"{source or 'study'} is not valid TOML: {exc}") from None
    return parse_study(data, default_name, base_dir)


def load_study(name_or_path: str, presets: dict[str, StudyPreset]) -> Study:
    """A preset by name, or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise LesionbenchError(f"study file {name_or_path!r} does not exist")
        return parse_toml(path.read_text(), default_name=path.stem, base_dir=path.parent,
                          source=f"study file {name_or_path!r}")  # fmt: skip
    if name_or_path not in presets:
        raise unknown_name("study", name_or_path, presets)
    return parse_toml(presets[name_or_path].toml, default_name=name_or_path, source=f"study preset {name_or_path!r}")


def with_overrides(study: Study, **overrides: Any) -> Study:
    """Apply command-line overrides (None means: keep the study's value).

    ``models``, ``layers``, ``perturbations`` take lists (a model reference the study already
    lists keeps its entry: weights, checkpoint, options); ``levels`` one list for every
    perturbation; ``data``, ``dataset``, ``n_images`` and ``subset_seed`` change the dataset; any other key is a
    study option by name.
    """
    changes: dict[str, Any] = {}
    dataset_changes: dict[str, Any] = {}
    options = {f.name for f in fields(Study)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "models":
            listed = {m.ref: m for m in study.models}
            changes["models"] = tuple(listed.get(m, ModelSpec(m)) for m in value)
        elif key in ("data", "dataset", "n_images", "subset_seed"):
            dataset_changes[{"data": "path", "dataset": "name"}.get(key, key)] = value
        elif key == "levels":
            changes["levels"] = _levels_override(study, value, overrides.get("perturbations"))
        elif key in ("layers", "perturbations"):
            changes[key] = tuple(value)
        elif key in options:
            changes[key] = value
        else:
            raise LesionbenchError(f"unknown study option {key!r}")
    for key, other in (("layers", "layer_count"), ("layer_count", "layers")):  # one way of naming layers wins
        if key in changes and other not in changes:
            changes[other] = default_of(other)
    if "perturbations" in changes and "levels" not in changes:  # levels of perturbations left out go too
        changes["levels"] = {p: v for p, v in study.levels.items() if p in changes["perturbations"]}
    if dataset_changes:
        if "name" in dataset_changes and dataset_changes["name"] != study.dataset.name:
            dataset_changes.setdefault("path", None)  # another dataset: the study's path was for its own
            dataset_changes.setdefault("split", "val" if dataset_changes["name"] == "image_folder" else "test")
        changes["dataset"] = replace(study.dataset, **dataset_changes)
    out = replace(study, **changes)
    validate_scalars(out)
    return out


def _levels_override(study: Study, value: Any, perturbations: Sequence[str] | None) -> dict[str, tuple[float, ...]]:
    """``levels``: one list of numbers for every perturbation, or (as a study file's ``[levels]`` table) a
    mapping perturbation → list; perturbations a mapping leaves out keep the study's levels."""
    def grid(where: str, given: Any) -> tuple[float, ...]:
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or not given or not all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) for x in given):  # fmt: skip
            raise LesionbenchError(f"{where} must be a non-empty list of numbers, got {given!r}")
        return tuple(float(x) for x in given)

    if isinstance(value, Mapping):
        return {**study.levels, **{str(p): grid(f"levels[{p!r}]", v) for p, v in value.items()}}
    one = grid("levels (one list for every perturbation, or a mapping perturbation → list)", value)
    return {p: one for p in perturbations or study.perturbations}


def default_of(name: str) -> Any:
    """The default of a study option."""
    f = next(f for f in fields(Study) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
