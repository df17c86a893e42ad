"""lesionbench.testing over everything registered: one test per contribution (timm's style).

A perturbation is checked on the tiny CNN, or on the tiny transformer when it damages nothing in a CNN
(attention heads, MLP neurons, transformer blocks). Model sources and datasets are checked against
their contract; those that build or load offline and fast are built or loaded too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lesionbench.registry import get_registry
from lesionbench.testing import (
    NotApplicable, check_contract, check_dataset, check_model_source, check_perturbation, check_study_preset, tiny_cnn, tiny_transformer,
)
from conftest import write_fashion

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
