"""Reading a study: a TOML file or text, a preset, a mapping (a manifest's copy, the Python API's), and the
command line's overrides, each checked with the first bad key named.

The study itself — the :class:`Study` dataclass and each option's declaration — is
:mod:`lesionbench.study_schema`; its names are re-exported here, where callers have always found them.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import tomllib

from lesionbench.errors import LesionbenchError, unknown_name
from lesionbench.model_sources import ModelSpec
from lesionbench.study_schema import (
    _DATASET_HINTS,
    _HINTS,
    DEFAULT_PERTURBATIONS,
    DatasetSpec,
    Study,
    StudyPreset,
    _scalar_type,
    default_of,
    option,
    option_fields,
    option_type,
    validate_scalars,
)

_MODEL_KEYS = {"ref": str, "weights": str, "checkpoint": str, "options": dict, "init_checkpoint": str}


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
        return ModelSpec(
            item["ref"],
            item.get("weights"),
            item.get("checkpoint"),
            dict(item.get("options", {})),
            item.get("init_checkpoint"),
        )
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

        models = tuple(
            replace(m, checkpoint=relative(m.checkpoint), init_checkpoint=relative(m.init_checkpoint))
            for m in study.models
        )
        study = replace(study, models=models)
    validate_scalars(study)
    return study


def parse_toml(
    text: str, default_name: str = "study", base_dir: Path | None = None, source: str | None = None
) -> Study:
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
        return parse_toml(
            path.read_text(), default_name=path.stem, base_dir=path.parent, source=f"study file {name_or_path!r}"
        )
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
        if (
            isinstance(given, (str, bytes))
            or not isinstance(given, Sequence)
            or not given
            or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in given)
        ):
            raise LesionbenchError(f"{where} must be a non-empty list of numbers, got {given!r}")
        return tuple(float(x) for x in given)

    if isinstance(value, Mapping):
        return {**study.levels, **{str(p): grid(f"levels[{p!r}]", v) for p, v in value.items()}}
    one = grid("levels (one list for every perturbation, or a mapping perturbation → list)", value)
    return {p: one for p in perturbations or study.perturbations}


__all__ = [
    "DEFAULT_PERTURBATIONS",
    "DatasetSpec",
    "Study",
    "StudyPreset",
    "default_of",
    "load_study",
    "option",
    "option_fields",
    "option_type",
    "parse_study",
    "parse_toml",
    "validate_scalars",
    "with_overrides",
]
