"""Conformance checks for plugins: what every contribution of a kind must do, for a plugin's own tests.

Each ``check_*`` function raises :class:`AssertionError` naming the contribution and the broken rule,
and returns what it checked, so it can be called from any test runner::

    from lesionbench.testing import check_perturbation
    from my_package.my_plugin import MyPerturbation

    def test_my_perturbation_keeps_the_contract():
        check_perturbation(MyPerturbation(name="my_damage", ...))

lesionbench runs them over everything its registry holds (``tests/test_conformance.py``, one test per
contribution). The rules are those of :mod:`lesionbench.hookspecs` and of each kind's contract class
(:mod:`lesionbench.contracts`); the checks run on the CPU, on tiny models built here
(:func:`tiny_cnn`, :func:`tiny_transformer`), in well under a second each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from lesionbench.contracts import problem
from lesionbench.errors import LesionbenchError
from lesionbench.kinds import perturbation_kind
from lesionbench.perturbation import check_levels, generator_for, model_checksum, perturbed


class NotApplicable(Exception):
    """The perturbation damages no layer of the model it was checked on (e.g. attention heads of a CNN)."""


@dataclass
class TinyModel:
    """A small model in eval mode with an example batch: float32 inputs [4, 3, 16, 16], 5 classes."""

    name: str
    module: nn.Module
    example: torch.Tensor
    initial: dict[str, torch.Tensor] | None = None  # the state at initialisation (before "training")


def _trained(name: str, model: nn.Module) -> TinyModel:
    """``model`` in eval mode after a stand-in for training (its weights moved off their
    initialisation, which is kept for the reinit perturbation), with an example batch."""
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and key.endswith("weight"):
                tensor.add_(torch.randn(tensor.shape, generator=generator_for(len(key))) * 0.1)
    return TinyModel(name, model.eval(), torch.randn(4, 3, 16, 16, generator=generator_for(1)), initial)


def tiny_cnn() -> TinyModel:
    """Conv–BatchNorm–ReLU, a residual stage of two torchvision ``BasicBlock`` s (``layer1``), global
    pooling and a Linear head: conv, linear, BatchNorm-fed and residual layers; seeded, 8 channels."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("bn1", nn.BatchNorm2d(8))
    model.add_module("relu", nn.ReLU())
    model.add_module("layer1", nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8)))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(8, 5))
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so silencing through them shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return _trained("tiny_cnn", model)


def tiny_transformer() -> TinyModel:
    """A timm VisionTransformer (16-px images, patches of 8, width 32, 2 blocks of 2 heads, 5 classes):
    attention heads, MLPs and transformer blocks for the transformer perturbations."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    return _trained("tiny_transformer", model)


def _fail(what: str, name: str, rule: str) -> AssertionError:
    return AssertionError(f"{what} {name!r}: {rule}")


def check_contract(kind: str, obj: Any) -> None:
    """``obj`` fits the contract of ``kind`` (``"perturbations"``, ``"models"``, ``"datasets"``, ``"studies"``…)."""
    found = problem(kind, obj)
    if found:
        raise _fail(kind.rstrip("s"), str(getattr(obj, "name", obj)), f"breaks the contract: {found}")


def _layers(perturbation: Any, model: TinyModel) -> list:
    """The layers ``perturbation`` damages in ``model``: its own targets, or the model's layers it accepts."""
    from lesionbench.graph import ModelGraph

    layers = list(ModelGraph.of(model.module, model.example[:1]).layers)
    if model.initial is not None:  # as lesionbench.plan attaches a model's initial state
        layers = [
            replace(
                l,
                initial={
                    k.removeprefix(f"{l.name}."): v for k, v in model.initial.items() if k.startswith(f"{l.name}.")
                }
                or None,
            )
            for l in layers
        ]
    own = perturbation.targets(model.module, layers)
    accepted = []
    for layer in layers if own is None else list(own):
        try:
            perturbation.check_layer(layer)
            _check_by_forward(perturbation, layer, model)
        except LesionbenchError:
            continue
        accepted.append(layer)
    return accepted


def _check_by_forward(perturbation: Any, layer: Any, model: TinyModel) -> None:
    """The perturbation's plan-time check hooks on ``layer``, on one example (as lesionbench.plan runs them)."""
    handles = list(perturbation.check_hooks(layer) or []) if hasattr(perturbation, "check_hooks") else []
    try:
        if handles:
            with torch.no_grad():
                model.module(model.example[:1])
    finally:
        for handle in handles:
            handle.remove()


def _forward(model: TinyModel) -> torch.Tensor:
    with torch.no_grad():
        return model.module(model.example).detach().clone()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal, NaN where NaN (damage may make NaN: it must make the same NaN)."""
    return (
        a.shape == b.shape and bool(torch.equal(a.isnan(), b.isnan())) and torch.equal(a.nan_to_num(), b.nan_to_num())
    )


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _most_damaging(perturbation: Any) -> float:
    levels = list(perturbation.default_levels)
    coords = perturbation.axis.kind.to_coord(levels)
    return float(levels[int(coords.argmax())])


def check_perturbation(perturbation: Any, model: TinyModel | None = None, seeds: Sequence[int] = (0, 1)) -> list[str]:
    """Check a perturbation against its contract on ``model`` (default :func:`tiny_cnn`), layer by layer.

    Rules: it fits :class:`lesionbench.Perturbation`'s fields and its kind's method; its default levels
    pass ``check_levels`` and ``check_level``; on every layer it accepts, (1) the identity level (if
    any) leaves the output and every tensor bit-identical, (2) the same seed gives the same output, a
    ``deterministic`` one gives it for any seed, (3) a weights perturbation changes no tensor outside
    the layer and the BatchNorms it feeds, and the output keeps its shape and dtype, (4) after the cell the model is bit-identical to before and
    no hook is left, and (5) some level changes what the model computes. Returns the names of the
    layers checked; raises :class:`NotApplicable` when it damages no layer of ``model``.
    """
    with _one_thread():
        return _check_perturbation(perturbation, model or tiny_cnn(), seeds)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (several contend on a busy machine); put back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_perturbation(perturbation: Any, model: TinyModel, seeds: Sequence[int]) -> list[str]:
    name = str(getattr(perturbation, "name", perturbation))
    check_contract("perturbations", perturbation)
    try:
        levels = check_levels(perturbation, perturbation.default_levels)
        for level in levels:
            perturbation.check_level(level)
    except LesionbenchError as exc:
        raise _fail("perturbation", name, f"refuses one of its own default levels: {exc}") from None
    layers = _layers(perturbation, model)
    if not layers:
        raise NotApplicable(f"perturbation {name!r} damages no layer of {model.name}")
    kind = perturbation_kind(perturbation.kind)
    clean, checksum, hooks = _forward(model), model_checksum(model.module), _hook_count(model.module)
    worst, changed = _most_damaging(perturbation), False

    def cell(layer, level: float, seed: int, inspect: Callable[[], None] | None = None) -> torch.Tensor:
        with perturbed(layer, perturbation, level, generator_for(seed)):
            out = _forward(model)
            if inspect is not None:
                inspect()
        if model_checksum(model.module) != checksum:
            raise _fail("perturbation", name, f"layer {layer.name!r} at level {level:g} is not restored after the cell")
        if _hook_count(model.module) != hooks:
            raise _fail("perturbation", name, f"layer {layer.name!r} at level {level:g} leaves a hook installed")
        return out

    for layer in layers:
        if perturbation.identity_level is not None:
            ident = cell(
                layer,
                perturbation.identity_level,
                seeds[0],
                lambda: _same_tensors(model.module, checksum, name, "its identity level"),
            )
            if not torch.equal(ident, clean):
                raise _fail("perturbation", name, f"its identity level changes the output of layer {layer.name!r}")
        own = {id(t) for m in layer.modules() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
        before = {k: t.detach().clone() for k, t in model.module.state_dict(keep_vars=True).items() if id(t) not in own}
        # bound now (partial), not looked up when called: the loop's names move on
        outside = partial(_unchanged_outside, model.module, before, own, name, layer.name) if not kind.hooked else None
        first = cell(layer, worst, seeds[0], outside)
        if first.shape != clean.shape or first.dtype != clean.dtype:
            raise _fail(
                "perturbation",
                name,
                f"layer {layer.name!r}: the output is {first.dtype} {tuple(first.shape)}, "
                f"not {clean.dtype} {tuple(clean.shape)} as without damage",
            )
        again = cell(layer, worst, seeds[0])
        if not _same(first, again):
            raise _fail(
                "perturbation", name, f"layer {layer.name!r} at level {worst:g}: the same seed gives different outputs"
            )
        if perturbation.deterministic:
            other = cell(layer, worst, seeds[-1])
            if not _same(first, other):
                raise _fail("perturbation", name, "is declared deterministic but two seeds give different outputs")
        changed = changed or not _same(first, clean)
    if not changed:
        raise _fail(
            "perturbation", name, f"its most damaging level {worst:g} changes nothing on any layer of {model.name}"
        )
    return [layer.name for layer in layers]


def _same_tensors(module: nn.Module, checksum: str, name: str, what: str) -> None:
    if model_checksum(module) != checksum:
        raise _fail("perturbation", name, f"{what} changes the model's tensors")


def _unchanged_outside(module: nn.Module, before: dict, own: set, name: str, layer: str) -> None:
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in own or key not in before:
            continue
        if not torch.equal(tensor.detach(), before[key]):
            raise _fail(
                "perturbation", name, f"damaging layer {layer!r} changed {key!r}, outside the layer and its norms"
            )


def check_model_source(source: Any, arch: str | None = None) -> str | None:
    """Check a model source against :class:`lesionbench.ModelSource`: ``examples()`` is a non-empty list
    of strings and ``claims`` answers a bool for each; with ``arch``, building it twice gives a
    :class:`lesionbench.LoadedModel` in eval mode with the same tensors (no hidden randomness) and a
    (C, H, W) input size. Returns the built model's checksum (None without ``arch``)."""
    from lesionbench.model_sources import LoadedModel, ModelSpec, create_model

    name = str(getattr(source, "name", source))
    check_contract("models", source)
    examples = source.examples()
    if not isinstance(examples, list) or not examples or not all(isinstance(e, str) and e for e in examples):
        raise _fail("model source", name, f"examples() must be a non-empty list of names, got {examples!r}")
    for example in examples:
        if not isinstance(source.claims(example), bool):
            raise _fail("model source", name, f"claims({example!r}) must return a bool")
    if arch is None:
        return None
    ref = arch if source.claims(arch) else f"{source.name}:{arch}"
    built = [create_model(ModelSpec(ref), {source.name: source}) for _ in range(2)]
    for loaded in built:
        if not isinstance(loaded, LoadedModel) or loaded.module.training:
            raise _fail("model source", name, f"build({ref!r}) must return a LoadedModel in eval mode")
        size = loaded.input_size
        if not (isinstance(size, tuple) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
            raise _fail("model source", name, f"input_size must be (C, H, W), got {size!r}")
    sums = [model_checksum(loaded.module) for loaded in built]
    if sums[0] != sums[1]:
        raise _fail("model source", name, f"building {ref!r} twice gives different weights")
    return sums[0]


def check_dataset(source: Any, path: str | None = None, split: str = "test") -> int:
    """Check a dataset source against :class:`lesionbench.DatasetSource`; with a ``path`` (or its
    ``default_path``), ``load`` gives a :class:`lesionbench.RawDataset` whose labels are int64 in
    [0, num_classes), whose first and last items decode, and which is the same when loaded twice.
    Returns the number of items (0 when there is nothing to load)."""
    import numpy as np

    from lesionbench.data import RawDataset

    name = str(getattr(source, "name", source))
    check_contract("datasets", source)
    where = path or source.default_path
    if where is None:
        return 0
    first, second = source.load(where, split), source.load(where, split)
    if not isinstance(first, RawDataset) or len(first) == 0:
        raise _fail("dataset", name, f"load({where!r}) must return a non-empty RawDataset")
    labels = np.asarray(first.labels)
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= first.num_classes:
        raise _fail("dataset", name, f"labels must be integers in [0, {first.num_classes})")
    if not np.array_equal(labels, np.asarray(second.labels)):
        raise _fail("dataset", name, "loading twice gives different labels")
    for index in (0, len(first) - 1):
        if first.decode(index) is None:
            raise _fail("dataset", name, f"item {index} decodes to None")
    return len(first)


def check_study_preset(preset: Any, registry: Any = None) -> Any:
    """Check a study preset against :class:`lesionbench.StudyPreset`: its TOML is a valid study, and
    every perturbation and the dataset it names are registered (``registry``: the default one).
    Returns the parsed :class:`lesionbench.Study`."""
    from lesionbench.registry import get_registry
    from lesionbench.study import parse_toml

    name = str(getattr(preset, "name", preset))
    check_contract("studies", preset)
    try:
        study = parse_toml(preset.toml, default_name=preset.name, source=f"study preset {preset.name!r}")
    except LesionbenchError as exc:
        raise _fail("study preset", name, f"is not a valid study: {exc}") from None
    registry = registry or get_registry()
    for pert in study.perturbations:
        registry.get("perturbations", pert.split("+")[0])
    registry.get("datasets", study.dataset.name)
    return study
