"""Model sources and the single door through which a study gets a model: :func:`create_model`.

A model reference is ``source:name`` (``timm:resnet18``, ``torchvision:alexnet``) or a bare name
that some source claims (``fashion_alexnet``). A source returns the module together with the
preprocessing its weights expect, so every model sees the same images prepared its own way.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lesionbench.errors import LesionbenchError, unknown_name

if TYPE_CHECKING:  # torch is imported where it is used: a study (and `lesionbench --help`) needs none
    import torch
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """What a study asks for: a reference plus optional weights, checkpoint and builder options."""

    ref: str
    weights: str | None = None  # e.g. "IMAGENET1K_V1", "pretrained", or a weights file for timm
    checkpoint: str | None = None  # a local state dict
    options: Mapping[str, Any] = field(default_factory=dict)  # e.g. num_classes, in_chans
    init_checkpoint: str | None = None  # the weights at initialisation, for the reinit perturbation

    @property
    def source(self) -> str | None:
        return self.ref.split(":", 1)[0] if ":" in self.ref else None

    @property
    def arch(self) -> str:
        return self.ref.split(":", 1)[1] if ":" in self.ref else self.ref


@dataclass
class LoadedModel:
    """A built model in eval mode with what the harness needs to feed and name it.

    The class count is not declared here: the harness reads it from the model's output. Inputs are
    given to the model in its own floating dtype (float32, float16 or bfloat16).
    """

    name: str
    module: nn.Module
    input_size: tuple[int, int, int]  # C, H, W
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> CHW float tensor
    preprocess_key: str  # equal keys mean equal tensors, so evaluation sets can be shared
    aliases: dict[str, str] = field(default_factory=dict)  # module path -> paper name
    # The whole model's state at initialisation, when the source (or the user) knows it.
    initial_state: Callable[[], Mapping[str, torch.Tensor]] | None = None
    # The device types the model's kernels run on (int8 models: the CPU only); checked before a run.
    devices: tuple[str, ...] = ("cpu", "cuda")
    # Where the labels are part of the input (a language model's next tokens): preprocessed inputs
    # [items, ...] -> int64 labels [items, positions], used instead of the dataset's labels.
    targets: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Ignored: the class count is read from the model's output. Kept so that model sources written
    # for lesionbench 0.1, which passed it, still build.
    num_classes: int | None = None


@runtime_checkable
class ModelSource(Protocol):
    """What a model plugin contributes: builds the models whose references it owns.

    ``name`` is the prefix in ``name:arch`` references; ``claims(arch)`` says which bare names it
    also owns; ``build(spec)`` returns a :class:`LoadedModel` in eval mode, raising
    LesionbenchError for weights it cannot find or options it cannot take.
    """

    name: str  # the prefix in "name:arch"
    description: str

    def claims(self, arch: str) -> bool:
        """Whether a bare name (no prefix) belongs to this source."""

    def examples(self) -> list[str]:
        """A few names this source builds, for listings."""

    def build(self, spec: ModelSpec) -> LoadedModel:
        """Build the model ``spec`` describes, weights loaded, in eval mode."""


def resolve_source(spec: ModelSpec, sources: Mapping[str, ModelSource]) -> str:
    """The name of the source that builds ``spec``: its prefix, or the first source claiming the bare name."""
    if spec.source is not None:
        if spec.source not in sources:
            raise unknown_name("model source", spec.source, sources)
        return spec.source
    claiming = [p for p, s in sources.items() if s.claims(spec.arch)]
    if not claiming:
        known = [n if s.claims(n) else f"{p}:{n}" for p, s in sources.items() for n in s.examples()]
        raise unknown_name("model", spec.ref, known + [f"{p}:<name>" for p in sources])
    return claiming[0]


def create_model(spec: ModelSpec | str, sources: Mapping[str, ModelSource]) -> LoadedModel:
    """Resolve ``spec`` to a source and build it."""
    if isinstance(spec, str):
        spec = ModelSpec(spec)
    source = sources[resolve_source(spec, sources)]
    try:
        loaded = source.build(spec)
    except (TypeError, ValueError) as exc:  # options the builder does not take, or of the wrong type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LesionbenchError(
            f"model {spec.ref!r} could not be built with options {dict(spec.options)}: {first}"
        ) from None
    loaded.module.eval()
    if spec.init_checkpoint:
        initial = load_state_dict(spec.init_checkpoint)
        initial = {k.removeprefix("module."): v for k, v in initial.items()}
        expected = loaded.module.state_dict()
        wrong = [k for k, v in expected.items() if k not in initial or initial[k].shape != v.shape]
        if wrong:
            raise LesionbenchError(
                f"init_checkpoint {spec.init_checkpoint!r} does not fit model {spec.ref!r} "
                f"({len(wrong)} tensors missing or of another shape, e.g. {wrong[0]!r})"
            )
        loaded.initial_state = lambda: initial
    return loaded


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``; refuse anything else with a clear reason."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise LesionbenchError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LesionbenchError(
            f"checkpoint {str(path)!r} carries pickled objects that weights_only=True refuses to load "
            f"({first}); save a plain state dict instead"
        ) from None
    except Exception as exc:  # corrupt bytes surface as RuntimeError, EOFError, KeyError, IndexError, struct.error...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LesionbenchError(f"checkpoint {str(path)!r} is unreadable or truncated: {first}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise LesionbenchError(f"checkpoint {str(path)!r} is not a state dict (a mapping of names to tensors)")
    return obj


def load_checkpoint_into(module: nn.Module, path: str | Path) -> None:
    """Load a state dict file into ``module`` strictly, naming the mismatch if there is one."""
    state = load_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # strict=False still raises on shape mismatches
        lines = [l.strip() for l in str(exc).splitlines() if l.strip().startswith("size mismatch")]
        detail = lines[0] if lines else str(exc).strip().splitlines()[0]
        raise LesionbenchError(f"checkpoint {str(path)!r} does not fit the model: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys (e.g. {result.missing_keys[0]!r})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[0]!r})")
    if problems:
        raise LesionbenchError(f"checkpoint {str(path)!r} does not fit the model: " + "; ".join(problems))
