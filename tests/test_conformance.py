"""lesionbench.testing over everything registered: one test per contribution (timm's style).

A perturbation is checked on the tiny CNN, or on the tiny transformer when it damages nothing in a CNN
(attention heads, MLP neurons, transformer blocks). Model sources and datasets are checked against
their contract; those that build or load offline and fast are built or loaded too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import write_fashion
from lesionbench.perturbation import LevelAxis, WeightPerturbation
from lesionbench.registry import get_registry
from lesionbench.study import StudyPreset
from lesionbench.testing import (
    NotApplicable,
    check_contract,
    check_dataset,
    check_model_source,
    check_perturbation,
    check_study_preset,
    tiny_cnn,
    tiny_transformer,
)

REGISTRY = get_registry()
PERTURBATIONS = sorted(REGISTRY.contributions("perturbations"))
MODELS = sorted(REGISTRY.contributions("models"))
DATASETS = sorted(REGISTRY.contributions("datasets"))
STUDIES = sorted(REGISTRY.contributions("studies"))
BUILT = {"fashion": "fashion_alexnet"}  # built from weights in the repository, in a second


@pytest.fixture(scope="module")
def tiny_models():
    return tiny_cnn(), tiny_transformer()


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_perturbation_conforms(name, tiny_models):
    perturbation = REGISTRY.get("perturbations", name)
    for model in tiny_models:
        try:
            assert check_perturbation(perturbation, model)
            return
        except NotApplicable:
            continue
    pytest.fail(f"perturbation {name!r} damages no layer of the tiny CNN or transformer")


@pytest.mark.parametrize("name", MODELS)
def test_model_source_conforms(name):
    check_model_source(REGISTRY.get("models", name), BUILT.get(name))


def _image_folder(root: Path) -> str:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(root / label / f"{i}.png")
    return str(root)


def _text(root: Path) -> str:
    root.mkdir()
    (root / "text.txt").write_text(" ".join(f"word{i % 17}" for i in range(400)))
    return str(root / "text.txt")


# dataset -> (what writes a small copy under a folder and returns its path, split)
DATA = {
    "fashion_mnist": (lambda root: str(write_fashion(root, n=12)), "test"),
    "synthetic": (lambda root: "n=6,size=8,classes=3", "test"),
    "image_folder": (_image_folder, "val"),
    "text": (_text, "tokens=4"),
}


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_conforms(name, tmp_path):
    source = REGISTRY.get("datasets", name)
    if name not in DATA:  # a third party's: its contract (its data is its own tests' business)
        check_contract("datasets", source)
        return
    write, split = DATA[name]
    assert check_dataset(source, write(tmp_path / "data"), split) > 0


@pytest.mark.parametrize("name", STUDIES)
def test_study_preset_conforms(name):
    study = check_study_preset(REGISTRY.get("studies", name), REGISTRY)
    assert study.name == name


# ---------------------------------------------------------------- the checks catch what they claim to


class _Scale(WeightPerturbation):
    """weight *= 1 − level: deterministic, identity at 0; subclasses break one rule each."""

    def apply(self, layer, level, generator):
        layer.module.weight.mul_(1 - level)


class _Unseeded(_Scale):
    def apply(self, layer, level, generator):
        layer.module.weight.add_(torch.rand(layer.module.weight.shape) * level)  # the global RNG, not generator


class _NotIdentity(_Scale):
    def apply(self, layer, level, generator):
        layer.module.weight.add_(1.0)


class _LeavesHook(_Scale):
    def apply(self, layer, level, generator):
        layer.module.register_forward_hook(lambda _m, _i, out: out * (1 - level))


class _Outside(_Scale):
    def targets(self, model, layers):
        self.__dict__["model"] = model  # frozen dataclass: keep the model to reach outside the layer
        return None

    def apply(self, layer, level, generator):
        self.model.fc.bias.add_(level)


class _Seeded(_Scale):
    def apply(self, layer, level, generator):
        layer.module.weight.add_(torch.rand(layer.module.weight.shape, generator=generator) * level)


def _make(cls, **extra):
    fields = dict(
        name=cls.__name__.lower(),
        description="a test perturbation",
        default_levels=(0.0, 0.5, 1.0),
        level_range=(0.0, 1.0),
        axis=LevelAxis("fraction p"),
    )
    return cls(**{**fields, **extra})


@pytest.mark.parametrize(
    "perturbation, message",
    [
        (_make(_Unseeded), "the same seed gives different outputs"),
        (_make(_NotIdentity), "its identity level changes"),
        (_make(_LeavesHook), "leaves a hook installed"),
        (_make(_Outside), "changed 'fc.bias', outside the layer"),
        (_make(_Seeded, deterministic=True), "declared deterministic but two seeds give different outputs"),
        (_make(_Scale, default_levels=(0.0,)), "changes nothing on any layer"),
        (_make(_Scale, default_levels=(0.0, 2.0)), "breaks the contract: default level 2.0 is outside its level_range"),
    ],
)
def test_check_perturbation_catches_a_broken_rule(perturbation, message, tiny_models):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_perturbation(perturbation, tiny_models[0])


def test_check_perturbation_passes_a_good_one_on_every_layer(tiny_models):
    checked = check_perturbation(_make(_Scale, deterministic=True), tiny_models[0])
    assert checked == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "fc"]


class _Source:
    name, description = "src", "a model source"

    def claims(self, arch):
        return arch == "net"

    def examples(self):
        return ["net"]


@pytest.mark.parametrize(
    "kind, obj, message",
    [
        ("models", _Source(), "it has no method 'build'"),
        (
            "datasets",
            type("D", (), {"name": "d", "description": "x", "default_path": 3, "load": lambda s, p, t: None})(),
            "field 'default_path' must be a string or None, got 3",
        ),
        (
            "perturbations",
            _make(_Scale, default_levels=("a",)),
            "field 'default_levels' must be a non-empty sequence of finite numbers, got ('a',)",
        ),
        (
            "perturbations",
            _make(_Scale, level_range=(0.0, float("nan"))),
            "field 'level_range' must be a sequence (a finite number, a finite number), got (0.0, nan)",
        ),
        ("perturbations", _make(_Scale, axis="log"), "field 'axis' must be a lesionbench.LevelAxis, got 'log'"),
        ("studies", StudyPreset(" ", "", "x = 1"), "field 'name' must be a non-empty string"),
    ],
)
def test_contracts_are_read_from_each_kinds_class(kind, obj, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_contract(kind, obj)
    assert REGISTRY.contributions(kind)  # every built-in of the kind fits the same check


def test_every_kind_has_a_contract_class():
    from lesionbench.contracts import CONTRACTS, contract_of
    from lesionbench.registry import KINDS

    assert set(KINDS) <= set(CONTRACTS)  # a new kind names its Protocol or base class in CONTRACTS
    for kind in KINDS:
        contract = contract_of(kind)
        assert isinstance(contract, type) and contract.__module__.startswith("lesionbench"), kind
