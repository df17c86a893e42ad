"""Perturbations of issue #6 (quantization, re-initialisation, activation damage, block removal),
each checked against the definition in its module docstring."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from torch import nn

from lesionbench.cli import main
from lesionbench.errors import LesionbenchError
from lesionbench.graph import discover_layers
from lesionbench.model_sources import ModelSpec, create_model
from lesionbench.perturbation import generator_for, model_checksum, perturbed
from lesionbench.registry import create_registry

NEW = [
    "quantize",
    "quantize_per_channel",
    "reinit",
    "rerandomize",
    "activation_knockout",
    "activation_noise",
    "block_removal",
]


@pytest.fixture(scope="module")
def sources(registry):
    return {name: c.obj for name, c in registry.contributions("models").items()}


def linear_layer(out=64, inp=50):
    torch.manual_seed(0)
    module = nn.Linear(inp, out)
    with torch.no_grad():
        module.weight.copy_(torch.randn(out, inp))
        module.bias.copy_(torch.randn(out) + 10)
    (layer,) = discover_layers(module, torch.zeros(1, inp))
    return module, layer


def conv_layer(cout=16, cin=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1))
    (layer,) = discover_layers(model, torch.zeros(1, cin, 8, 8))
    return model, layer


def test_each_new_perturbation_is_registered_and_listed(perts, capsys):
    assert main(["list", "perturbations"]) == 0
    out = capsys.readouterr().out
    for name in NEW:
        assert name in perts and name in out, name


# ---------------------------------------------------------------- quantize


def check_quantized(q: torch.Tensor, w: torch.Tensor, bits: int) -> None:
    """q is w rounded to the symmetric grid scale·{-(2^(k-1)-1), …, 2^(k-1)-1}, scale = max|w|/(2^(k-1)-1)."""
    q, w = q.detach(), w.detach()
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().max()
    if amax == 0:
        assert torch.equal(q, torch.zeros_like(q))
        return
    scale = amax / qmax
    codes = q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-3), "every value is a multiple of the scale"
    assert int(codes.round().abs().max()) <= qmax
    assert len(q.unique()) <= 2**bits
    float_error = 4 * torch.finfo(torch.float32).eps * float(amax)  # float32 arithmetic on top of rounding
    assert float((q - w).abs().max()) <= float(scale) / 2 + float_error
    assert math.isclose(float(q.abs().max()), float(amax), rel_tol=1e-6), "the largest |w| is on the grid"


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_quantize_rounds_the_whole_weight_to_k_bits_and_keeps_the_bias(perts, bits):
    module, layer = linear_layer()
    w0, b0 = module.weight.clone(), module.bias.clone()
    before = model_checksum(module)
    with perturbed(layer, perts["quantize"], bits, generator_for(0)):
        check_quantized(module.weight.detach(), w0, bits)
        assert torch.equal(module.bias, b0), "bias stays in full precision"
        if bits <= 4:
            assert len(module.weight.unique()) > 2 ** (bits - 1), "the grid is used, not a coarser one"
    assert model_checksum(module) == before


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_per_channel_uses_one_scale_per_output_channel(perts, bits):
    model, layer = conv_layer(cout=8)
    conv = layer.module
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-3, 1, 8).view(8, 1, 1, 1))  # channels of very different sizes
        conv.weight[5] = 0  # a dead channel
    w0, b0 = conv.weight.clone(), conv.bias.clone()
    with perturbed(layer, perts["quantize_per_channel"], bits, generator_for(0)):
        q = conv.weight.detach()
        assert torch.isfinite(q).all()
        for c in range(8):
            check_quantized(q[c], w0[c], bits)
        per_channel_error = (q - w0).abs().amax(dim=(1, 2, 3))
        assert torch.equal(conv.bias, b0)
    with perturbed(layer, perts["quantize"], bits, generator_for(0)):
        per_tensor_error = (conv.weight - w0).abs().amax(dim=(1, 2, 3))
    small = [0, 1, 2]  # the small channels lose far less with their own scale
    assert (per_channel_error[small] < per_tensor_error[small]).all()
    assert torch.equal(conv.weight, w0)


def test_quantize_damage_grows_as_bits_fall_and_refuses_fractional_bits(perts):
    model, layer = conv_layer()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        clean = model(x)
        errors = []
        for bits in (16, 8, 4, 2):
            with perturbed(layer, perts["quantize"], bits, generator_for(0)):
                errors.append(float((model(x) - clean).norm()))
    assert errors == sorted(errors) and errors[0] < 1e-3 * float(clean.norm())
    for name in ("quantize", "quantize_per_channel"):
        p = perts[name]
        assert p.axis.damage_grows is False and p.identity_level is None
        assert min(p.default_levels) == 2 and max(p.default_levels) == 8
    with pytest.raises(LesionbenchError, match="whole number of bits"):
        with perturbed(layer, perts["quantize"], 4.5, generator_for(0)):
            pass


# ---------------------------------------------------------------- reinit / rerandomize


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_reinit_interpolates_to_the_layers_own_initial_tensors(perts, alpha):
    module, layer = linear_layer()
    w0, b0 = module.weight.clone(), module.bias.clone()
    wi, bi = torch.randn_like(w0), torch.randn_like(b0)
    layer = replace(layer, initial={"weight": wi, "bias": bi})
    before = model_checksum(module)
    with perturbed(layer, perts["reinit"], alpha, generator_for(0)):
        w, b = module.weight.detach(), module.bias.detach()
        if alpha == 0:
            assert torch.equal(w, w0) and torch.equal(b, b0)
        elif alpha == 1:
            assert torch.equal(w, wi) and torch.equal(b, bi)
        else:
            assert torch.allclose(w, alpha * wi + (1 - alpha) * w0, atol=1e-6)
            assert torch.allclose(b, alpha * bi + (1 - alpha) * b0, atol=1e-6)
    assert model_checksum(module) == before


def test_reinit_without_initial_weights_says_what_to_give(perts):
    module, layer = linear_layer()
    with pytest.raises(LesionbenchError) as info:
        with perturbed(layer, perts["reinit"], 0.5, generator_for(0)):
            pass
    message = str(info.value)
    assert "init_checkpoint" in message and "\n" not in message
    assert torch.equal(module.weight, linear_layer()[0].weight)


@pytest.mark.parametrize("make", [lambda: nn.Linear(50, 64), lambda: nn.Conv2d(8, 32, 3)])
def test_rerandomize_draws_the_layers_own_initialiser_seeded_by_the_generator(perts, make):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    example = torch.zeros(1, 50) if isinstance(model[0], nn.Linear) else torch.zeros(1, 8, 6, 6)
    (layer,) = discover_layers(model, example)
    module = layer.module
    with torch.no_grad():
        module.weight.normal_(0, 3)  # "trained": unlike the initialiser
        module.bias.normal_(5, 1)
    w0, b0 = module.weight.clone(), module.bias.clone()
    fan_in = w0[0].numel()
    bound = 1 / math.sqrt(fan_in)  # PyTorch's kaiming_uniform(a=√5) for weight and bias

    def draw(seed, alpha=1.0):
        with perturbed(layer, perts["rerandomize"], alpha, generator_for(seed)):
            return module.weight.detach().clone(), module.bias.detach().clone()

    rng = torch.random.get_rng_state()
    w1, b1 = draw(1)
    assert torch.equal(torch.random.get_rng_state(), rng), "the global RNG is left alone"
    assert torch.equal(w1, draw(1)[0]) and not torch.equal(w1, draw(2)[0])
    assert w1.abs().max() <= bound and b1.abs().max() <= bound
    assert abs(float(w1.std()) - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)  # uniform(-bound, bound)
    wh, bh = draw(1, 0.5)  # the same fresh draw, half way
    assert torch.allclose(wh, 0.5 * w1 + 0.5 * w0, atol=1e-6) and torch.allclose(bh, 0.5 * b1 + 0.5 * b0, atol=1e-6)
    assert torch.equal(draw(1, 0.0)[0], w0)
    assert torch.equal(module.weight, w0) and torch.equal(module.bias, b0)


def test_fashion_models_know_the_weights_their_training_started_from(sources, tmp_path):
    """Training seeds torch then builds the model: the rebuilt init is what train() started from."""
    import lesionbench.train as train_mod
    from lesionbench.models.fashion import ARCHITECTURES, training_record

    class Started(Exception):
        pass

    real = train_mod.create_model
    for arch in ARCHITECTURES:
        record = training_record(arch)
        loaded = create_model(arch, sources)
        rng = torch.random.get_rng_state()
        initial = loaded.initial_state()
        assert torch.equal(torch.random.get_rng_state(), rng), "the global RNG is left alone"
        assert set(initial) == set(loaded.module.state_dict())

        started = {}

        def capture(spec, srcs, started=started):  # this architecture's
            started.update({k: v.clone() for k, v in real(spec, srcs).module.state_dict().items()})
            raise Started

        config = train_mod.TrainConfig(model=arch, seed=record["seed"], options=record["options"])
        np_state = np.random.get_state()
        with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
            mp.setattr(train_mod, "create_model", capture)
            with pytest.raises(Started):
                train_mod.train(config, create_registry(), tmp_path / f"{arch}.pt")
        np.random.set_state(np_state)
        assert all(torch.equal(initial[k], started[k]) for k in started), arch

        # ...and the shipped weights grew out of it: each weight correlates with its init.
        trained = loaded.module.state_dict()
        for key, w in trained.items():
            if key.endswith("weight") and w.dim() > 1:
                r = torch.corrcoef(torch.stack([w.flatten().float(), initial[key].flatten().float()]))[0, 1]
                assert r > 0.25, (arch, key, float(r))


def test_fashion_initial_state_only_for_the_shipped_weights(sources, tmp_path):
    assert create_model(ModelSpec("fashion_alexnet", weights="none"), sources).initial_state is None
    ckpt = tmp_path / "w.pt"
    torch.save(create_model("fashion_alexnet", sources).module.state_dict(), ckpt)
    assert create_model(ModelSpec("fashion_alexnet", checkpoint=str(ckpt)), sources).initial_state is None


def test_reinit_on_a_shipped_model_returns_conv1_to_its_initial_weights(perts, sources):
    loaded = create_model("fashion_alexnet", sources)
    layers = discover_layers(loaded.module, torch.zeros(1, *loaded.input_size), loaded.aliases)
    state = loaded.initial_state()
    conv1 = layers[0]
    conv1 = replace(conv1, initial={k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{conv1.name}.")})
    with perturbed(conv1, perts["reinit"], 1.0, generator_for(0)):
        assert torch.equal(conv1.module.weight, state[f"{conv1.name}.weight"])
        assert torch.equal(conv1.module.bias, state[f"{conv1.name}.bias"])


# ---------------------------------------------------------------- activation damage


def positive_conv():
    model, layer = conv_layer(cout=16)
    with torch.no_grad():
        layer.module.bias.fill_(5.0)  # no output value is 0 by chance
    return model, layer


@pytest.mark.parametrize("p", [0.25, 0.5, 1.0])
def test_activation_knockout_zeroes_floor_p_units_per_image(perts, p):
    model, layer = positive_conv()
    x = torch.randn(8, 3, 8, 8) * 0.1
    before = model_checksum(model)
    with torch.no_grad():
        clean = model(x)
        with perturbed(layer, perts["activation_knockout"], p, generator_for(3)):
            out = model(x)
            assert model_checksum(model) == before, "weights untouched"
        assert not layer.module._forward_hooks, "hook removed on exit"
        assert torch.equal(model(x), clean)
    dead = (out == 0).all(dim=(2, 3))  # [N, C]
    assert (dead.sum(dim=1) == math.floor(p * 16)).all()
    assert torch.equal(out[~dead], clean[~dead])
    assert ((out == 0) == dead[:, :, None, None].expand_as(out)).all(), "whole channels, nothing else"
    if p < 1:
        assert len({tuple(row.tolist()) for row in dead}) > 1, "images get their own masks"


def test_activation_knockout_of_a_linear_layer_silences_features_and_is_reproducible(perts):
    module, layer = linear_layer()
    x = torch.randn(16, 50)

    def run(seed):
        with torch.no_grad(), perturbed(layer, perts["activation_knockout"], 0.3, generator_for(seed)):
            return module(x)

    out = run(1)
    assert ((out == 0).sum(dim=1) == math.floor(0.3 * 64)).all()
    assert torch.equal(out, run(1)) and not torch.equal(out, run(2))


@pytest.mark.parametrize("p", [0.5, 2.0])
def test_activation_noise_adds_noise_of_p_times_each_images_std(perts, p):
    model, layer = conv_layer(cout=32)
    x = torch.randn(64, 3, 16, 16)
    before = model_checksum(model)
    with torch.no_grad():
        clean = model(x)
        with perturbed(layer, perts["activation_noise"], p, generator_for(5)):
            noisy = model(x)
            again = model(x)
            assert model_checksum(model) == before
        assert torch.equal(model(x), clean)
    noise = (noisy - clean).flatten(1)
    sigma = clean.flatten(1).std(dim=1)
    assert torch.allclose(noise.std(dim=1), p * sigma, rtol=0.05)  # 8,192 values per image
    assert float((noise.mean(dim=1) / (p * sigma)).abs().max()) < 0.05
    with torch.no_grad(), perturbed(layer, perts["activation_noise"], p, generator_for(5)):
        split = torch.cat([model(x[:20]), model(x[20:])])
    assert torch.allclose((split - clean).flatten(1).std(dim=1), p * sigma, rtol=0.05)  # batch-independent scale
    assert not torch.equal(noisy, again), "a fresh draw at every forward call"


# ---------------------------------------------------------------- block removal


def removed_model(model: nn.Module, paths: list[str]) -> nn.Module:
    """A copy of ``model`` with the given blocks replaced by nn.Identity."""
    out = copy.deepcopy(model)
    for path in paths:
        parent, _, child = path.rpartition(".")
        setattr(out.get_submodule(parent), child, nn.Identity())
    return out


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    with torch.no_grad():  # timm zero-inits each block's last BatchNorm, which makes every block the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    return model, discover_layers(model, torch.zeros(1, 3, 32, 32))


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10).eval()
    return model, discover_layers(model, torch.zeros(1, 3, 64, 64))


def test_block_removal_targets_the_stages_that_have_identity_blocks(perts, resnet, mobilenet):
    p = perts["block_removal"]
    model, layers = resnet
    stages = p.targets(model, layers)
    assert [s.name for s in stages] == ["layer1", "layer2", "layer3", "layer4"]
    firsts = [next(l for l in layers if l.name.startswith(f"{s.name}.")) for s in stages]
    assert [s.index for s in stages] == [l.index for l in firsts]  # placed where their first layer is
    assert [s.relative_depth for s in stages] == [l.relative_depth for l in firsts]
    assert all(s.kind == "stage" and s.module is model.get_submodule(s.name) for s in stages)
    only = [l for l in layers if l.name.startswith("layer3.")]
    assert [s.name for s in p.targets(model, only)] == ["layer3"]
    model, layers = mobilenet  # blocks.0 (no skip) and blocks.5 (ConvBnAct) have nothing to remove
    assert [s.name for s in p.targets(model, layers)] == ["blocks.1", "blocks.2", "blocks.3", "blocks.4"]


@pytest.mark.parametrize(
    "which, stage, blocks",
    [
        ("resnet", "layer1", ["layer1.0", "layer1.1"]),
        ("resnet", "layer2", ["layer2.1"]),  # layer2.0 projects: it stays
        ("mobilenet", "blocks.2", ["blocks.2.1", "blocks.2.2"]),
    ],
)
def test_block_removal_at_p1_is_the_network_without_those_blocks(perts, request, which, stage, blocks):
    model, layers = request.getfixturevalue(which)
    size = 32 if which == "resnet" else 64
    x = torch.randn(2, 3, size, size)
    target = next(s for s in perts["block_removal"].targets(model, layers) if s.name == stage)
    before = model_checksum(model)
    with torch.no_grad():
        clean = model(x)
        with perturbed(target, perts["block_removal"], 1.0, generator_for(0)):
            out = model(x)
        assert all(not m._forward_hooks for m in model.modules()), "hooks removed on exit"
        assert torch.equal(model(x), clean) and model_checksum(model) == before
        expected = removed_model(model, blocks)(x)
    assert torch.equal(out, expected) and not torch.equal(out, clean)


def test_block_removal_removes_floor_p_n_blocks_at_random(perts, mobilenet):
    model, layers = mobilenet
    target = next(s for s in perts["block_removal"].targets(model, layers) if s.name == "blocks.4")
    candidates = ["blocks.4.1", "blocks.4.2"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        singles = {b: removed_model(model, [b])(x) for b in candidates}
        seen = set()
        for seed in range(12):
            with perturbed(target, perts["block_removal"], 0.5, generator_for(seed)):
                out = model(x)
            hit = [b for b, y in singles.items() if torch.equal(out, y)]
            assert len(hit) == 1, "exactly one of the two removable blocks is gone"
            seen.add(hit[0])
        with perturbed(target, perts["block_removal"], 0.4, generator_for(0)):  # floor(0.8) = 0
            assert torch.equal(model(x), removed_model(model, [])(x))
    assert seen == set(candidates), "either block may be chosen"
