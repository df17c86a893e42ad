"""The study: what to run, as one dataclass from which its TOML schema, checks and flags derive.

A study names models, a dataset and its subset, layers, perturbations with their levels, draws,
seed and device. Each scalar option is declared once, with :func:`option`: its default, its help
text (which the command line shows for its flag), whether it changes the numbers (then it is part
of the plan's fingerprint) and its bounds. TOML keys, their types, the ``--flag`` of each option
and the manifest's copy of the study all come from these declarations; :func:`validate_scalars`
checks the bounds and choices declared with them. Reading a study (TOML, a mapping, a preset, the
command line's overrides) is :mod:`lesionbench.study`, which also re-exports every name here.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from lesionbench.errors import LesionbenchError
from lesionbench.model_sources import ModelSpec

DEFAULT_PERTURBATIONS = ("synapse_knockout", "node_knockout", "weight_noise")


def option(
    default: Any,
    help: str,
    *,
    numbers: bool | str = False,
    flag: bool = True,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
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
    n_images: int | None = option(
        1000, "size of the seeded, class-stratified evaluation subset", numbers=True, flag=False, minimum=1
    )
    subset_seed: int = option(
        0,
        "seed of the evaluation subset (and the BatchNorm calibration subset): its own, "
        "not the study seed, so a run with another seed evaluates the same images",
        numbers="when_on",
        flag=False,
        minimum=0,
    )
    title: str | None = option(
        None,
        "what leaderboards call the data (e.g. 'ImageNet (sample)'; default: a known "
        "dataset's name, else the plugin's)",
        flag=False,
    )


@dataclass(frozen=True)
class Study:
    name: str = option("study", "the study's name (the default run directory is runs/<name>)", flag=False)
    description: str = option("", "what the study is for", flag=False)
    models: tuple[ModelSpec, ...] = option((), "model references", numbers=True, flag=False)
    dataset: DatasetSpec = option(DatasetSpec(), "the dataset", numbers=True, flag=False)
    perturbations: tuple[str, ...] = option(DEFAULT_PERTURBATIONS, "perturbation names", numbers=True, flag=False)
    levels: dict[str, tuple[float, ...]] = option(
        {}, "levels per perturbation (default: each one's own)", numbers=True, flag=False
    )
    layers: tuple[str, ...] = option(
        (), "layer names or aliases (empty: every Conv/Linear layer)", numbers=True, flag=False
    )
    layer_count: int | None = option(
        None,
        "study N layers per model at the same relative depths 0, 1/(N-1), …, 1 "
        "(each model's nearest layer; instead of 'layers')",
        numbers="when_on",
        minimum=2,
    )
    draws: int = option(5, "random draws per layer and level", numbers=True, minimum=1)
    # adaptive draws (off by default): more draws where a level's mean accuracy is still uncertain
    target_ci: float | None = option(
        None,
        "adaptive draws: after 'draws' draws, add draws to a layer × level until "
        "the 95 percent t-interval of its mean accuracy is narrower than this (e.g. 0.02)",
        numbers="when_on",
        minimum=0,
    )
    max_draws: int = option(
        20, "adaptive draws: at most this many draws per layer × level (with target_ci)", numbers="when_on", minimum=1
    )
    seed: int = option(
        0, "study seed (cells, random initialisations; the images are dataset.subset_seed's)", numbers=True, minimum=0
    )
    device: str = option("auto", "cpu, cuda, cuda:1 or auto (cuda when available)")
    batch_size: int = option(256, "evaluation batch size", minimum=1)
    metric: str = option("top1", "what scores are computed from", choices=("top1", "top5"))
    engine: str = option(
        "fast", "fast: evaluate only what a perturbation changes; naive: full passes", choices=("fast", "naive")
    )
    # None = on CUDA only: on the CPU the batched (grouped) convolutions measured slower than one pass per draw.
    batch_draws: bool | None = option(
        None, "evaluate a layer's draws in one vmapped pass (default: on CUDA only)", flag=False
    )
    autocast: bool = option(False, "mixed precision (float16 on CUDA, bfloat16 on CPU)", numbers="when_on")
    channels_last: bool = option(False, "NHWC memory layout for models and images", numbers="when_on")
    bn_recalibrate: bool = option(
        False, "re-estimate BatchNorm statistics on a calibration subset after each perturbation", numbers="when_on"
    )
    calibration_images: int = option(200, "images of that calibration subset (with bn_recalibrate)", minimum=1)

    def numbers(self) -> dict[str, Any]:
        """Everything in the study that determines the numbers (not name, device or batch size)."""
        payload: dict[str, Any] = {}
        for f in fields(self):
            value, mode = getattr(self, f.name), f.metadata["numbers"]
            if mode is True or (mode == "when_on" and value != default_of(f.name)):
                payload[f.name] = _plain(value)
        # the dataset's own options that do not change the numbers (its title) stay out
        payload["dataset"] = {
            f.name: _plain(getattr(self.dataset, f.name))
            for f in fields(DatasetSpec)
            if f.metadata["numbers"] is True
            or (f.metadata["numbers"] == "when_on" and getattr(self.dataset, f.name) != f.default)
        }
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


# ------------------------------------------------------------------------------------ options


def _scalar_type(hint: Any) -> type | None:
    """int/float/str/bool of a field's hint (``X | None`` gives X); None for structured fields."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    found = [a for a in args if a in (int, float, str, bool)]
    return found[0] if len(found) == 1 else None


_HINTS = typing.get_type_hints(Study)
_DATASET_HINTS = typing.get_type_hints(DatasetSpec)


def option_type(name: str) -> type | None:
    """int, float, str or bool: the scalar type of a study option (None for structured ones)."""
    return _scalar_type(_HINTS[name])


def option_fields(cls: type = Study) -> list:
    """The options of ``cls`` with their metadata, in declaration order."""
    return list(fields(cls))


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


def default_of(name: str) -> Any:
    """The default of a study option."""
    f = next(f for f in fields(Study) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
