"""Perturbations of issue #18 (filter pruning by norm, transient activation bit flips), each
checked against the definition in its module docstring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lesionbench.graph import discover_layers
from lesionbench.perturbation import cell_seed, generator_for, model_checksum, perturbed
from lesionbench.plugins.activation_bit_flip import flip_bits_per_image
from lesionbench.registry import create_registry


def conv_bn(cout=12, cin=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout)).eval()
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
        model[2].bias.uniform_(0.5, 1.5)
    (layer,) = discover_layers(model, torch.zeros(1, cin, 6, 6))
    return model, layer


# ---------------------------------------------------------------- filter_prune


@pytest.mark.parametrize(
    "name,norm", [("filter_prune", lambda w: w.abs().sum(1)), ("filter_prune_l2", lambda w: w.pow(2).sum(1).sqrt())]
)
@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_filter_prune_zeros_exactly_the_k_smallest_norm_filters(perts, name, norm, p):
    model, layer = conv_bn()
    with torch.no_grad():  # one spiky and one flat filter: the L1 and L2 rankings differ
        layer.module.weight[3] = 0.0
        layer.module.weight[3, 0, 0, 0] = 2.0  # L1 2, L2 2
        layer.module.weight[7] = 0.09  # 27 entries: L1 2.43, L2 0.47
    w0 = layer.module.weight.detach().clone()
    norms = norm(w0.reshape(len(w0), -1))
    k = math.floor(p * len(w0))
    expected = set(torch.argsort(norms)[:k].tolist())
    with perturbed(layer, perts[name], p, generator_for(0)):
        zero = {u for u in range(len(w0)) if torch.count_nonzero(layer.module.weight[u]) == 0}
        assert zero == expected
        kept = sorted(set(range(len(w0))) - expected)
        assert torch.equal(layer.module.weight[kept], w0[kept])
        for u in expected:  # silenced through the BatchNorm, as node_knockout does
            assert layer.module.bias[u] == 0
            bn = model[2]
            assert bn.weight[u] == 0 and bn.bias[u] == 0 and bn.running_mean[u] == 0
        out = model(torch.randn(2, 3, 6, 6))
        assert torch.all(out[:, sorted(expected)] == 0)
    assert torch.equal(layer.module.weight, w0)


def test_filter_prune_ranks_differ_between_l1_and_l2(perts):
    """The two variants are not the same perturbation: a spiky filter and a flat one swap ranks."""
    model, layer = conv_bn(cout=2)
    with torch.no_grad():
        layer.module.weight.zero_()
        layer.module.weight[0, 0, 0, 0] = 2.0  # L1 2, L2 2
        layer.module.weight[1] = 0.09  # L1 2.43, L2 0.47
    pruned = {}
    for name in ("filter_prune", "filter_prune_l2"):
        with perturbed(layer, perts[name], 0.5, generator_for(0)):
            pruned[name] = [u for u in range(2) if torch.count_nonzero(layer.module.weight[u]) == 0]
    assert pruned == {"filter_prune": [0], "filter_prune_l2": [1]}


def test_filter_prune_breaks_ties_by_lower_unit_index_and_is_deterministic(perts):
    model, layer = conv_bn(cout=6)
    with torch.no_grad():
        layer.module.weight.fill_(1.0)  # all six norms equal
    assert perts["filter_prune"].deterministic
    for seed in (0, 1):
        with perturbed(layer, perts["filter_prune"], 0.5, generator_for(seed)):
            zero = [u for u in range(6) if torch.count_nonzero(layer.module.weight[u]) == 0]
        assert zero == [0, 1, 2]


# ---------------------------------------------------------------- activation bit flips


def flipped_bits(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per image: how many stored bits differ between two float32 outputs [images, ...]."""
    x = (a.contiguous().view(torch.int32) ^ b.contiguous().view(torch.int32)).reshape(len(a), -1).numpy()
    return np.unpackbits(x.view(np.uint8), axis=1).sum(axis=1)


def conv_layer_out(n=200):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval()
    (layer,) = discover_layers(model, torch.zeros(1, 3, 8, 8))
    return model, layer, torch.randn(n, 3, 8, 8)


@pytest.mark.parametrize("p", [1e-4, 1e-3, 1e-2])
def test_activation_bit_flips_hit_the_expected_number_of_bits(perts, p):
    model, layer, x = conv_layer_out()
    with torch.no_grad():
        clean = model(x)
        with perturbed(layer, perts["activation_bit_flip"], p, generator_for(3)):
            damaged = model(x)
    per_image = flipped_bits(clean, damaged)
    bits = clean[0].numel() * 32
    n = len(x)
    mean, var = bits * p, bits * p * (1 - p)
    # total ~ Binomial(n·bits, p): within 4 standard deviations
    assert abs(per_image.sum() - n * mean) < 4 * math.sqrt(n * var)
    # per-image counts have the binomial's spread (not a fixed count, not a wider law)
    assert 0.7 < per_image.var(ddof=1) / var < 1.3


def test_activation_bit_flips_are_drawn_afresh_for_each_image(perts):
    model, layer, _ = conv_layer_out()
    x = torch.randn(1, 3, 8, 8).expand(64, -1, -1, -1).contiguous()  # the same image 64 times
    with torch.no_grad(), perturbed(layer, perts["activation_bit_flip"], 1e-2, generator_for(0)):
        damaged = model(x)
    distinct = {damaged[i].numpy().tobytes() for i in range(len(x))}
    assert len(distinct) == len(x)


def test_activation_faults_leave_the_weights_untouched(perts):
    model, layer, x = conv_layer_out(16)
    before = model_checksum(model)
    for name, level in (("activation_bit_flip", 1e-2), ("activation_bit_flip_single", 3)):
        with torch.no_grad(), perturbed(layer, perts[name], level, generator_for(0)):
            assert model_checksum(model) == before
            model(x)
            assert model_checksum(model) == before
    assert model_checksum(model) == before
    assert not layer.module._forward_hooks  # hooks removed with the block


@pytest.mark.parametrize("name,level", [("activation_bit_flip", 1e-3), ("activation_bit_flip_single", 1)])
def test_same_seed_same_faults_and_batching_does_not_matter(perts, name, level):
    model, layer, x = conv_layer_out(40)

    def faults(seed, batch):  # which stored bits the faults flipped (clean outputs may differ with the batch size)
        with torch.no_grad():
            clean = torch.cat([model(x[b : b + batch]) for b in range(0, len(x), batch)])
            with perturbed(layer, perts[name], level, generator_for(seed)):
                damaged = torch.cat([model(x[b : b + batch]) for b in range(0, len(x), batch)])
        return clean.view(torch.int32) ^ damaged.view(torch.int32)

    a, b, c = faults(7, 40), faults(7, 8), faults(8, 40)
    assert torch.count_nonzero(a) > 0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("k", [1, 3])
def test_single_fault_mode_flips_one_bit_in_each_of_k_values_per_image(perts, k):
    model, layer, x = conv_layer_out(50)
    with torch.no_grad():
        clean = model(x)
        with perturbed(layer, perts["activation_bit_flip_single"], k, generator_for(1)):
            damaged = model(x)
    per_image = flipped_bits(clean, damaged)
    assert per_image.tolist() == [k] * len(x)
    changed_values = (clean.view(torch.int32) != damaged.view(torch.int32)).reshape(len(x), -1).sum(1)
    assert changed_values.tolist() == [k] * len(x)


def test_single_fault_mode_takes_whole_numbers_only(perts):
    from lesionbench.errors import LesionbenchError

    with pytest.raises(LesionbenchError, match="whole number"):
        perts["activation_bit_flip_single"].check_level(1.5)


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning")
def test_bit_flips_in_a_quantized_activation_change_its_int8_codes_only():
    x = torch.quantize_per_tensor(torch.randn(30, 4, 5), 0.05, 128, torch.quint8)
    rng = np.random.default_rng(0)
    y = flip_bits_per_image(x, lambda values, width: rng.choice(values * width, size=2, replace=False))
    assert y.is_quantized and y.q_scale() == x.q_scale() and y.q_zero_point() == x.q_zero_point()
    diff = np.unpackbits((x.int_repr() ^ y.int_repr()).reshape(30, -1).numpy(), axis=1).sum(1)
    assert diff.tolist() == [2] * 30


# ---------------------------------------------------------------- through a study


def test_a_study_reports_nonfinite_outputs_of_activation_faults_and_leaves_weight_rows_empty():
    import lesionbench

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    images = torch.randn(1, 1, 8, 8).expand(30, -1, -1, -1).contiguous()  # one image: any evaluation order
    labels = torch.arange(30) % 3
    df = lesionbench.run(
        {
            "perturbations": ["activation_bit_flip", "filter_prune"],
            "layers": ["0"],
            "draws": 2,
            "levels": {"activation_bit_flip": [0.0, 0.05], "filter_prune": [0.0, 0.5]},
            "device": "cpu",
        },
        model=model,
        data=(images, labels),
    )
    flips = df[(df["perturbation"] == "activation_bit_flip") & (df["level"] == 0.05)]
    assert len(flips) == 2 and (flips["nonfinite_outputs"] > 0).all()  # 5% of bits: exponents hit, NaN/Inf out
    # the count is the harness's own: the same cell through lesioned() gives the same NaN/Inf values
    row = flips.sort_values("draw").iloc[0]
    (layer,) = discover_layers(model[:1], torch.zeros(1, 1, 8, 8))
    perts = {n: c.obj for n, c in create_registry().contributions("perturbations").items()}
    with (
        torch.no_grad(),
        perturbed(
            layer,
            perts["activation_bit_flip"],
            0.05,
            generator_for(cell_seed(0, "model", "0", "activation_bit_flip", 0.05, 0)),
        ),
    ):
        expected = int((~torch.isfinite(model[0](images))).sum())
    assert int(row["nonfinite_outputs"]) == expected
    pruned = df[df["perturbation"] == "filter_prune"]
    assert len(pruned) == 2 and pruned["nonfinite_outputs"].isna().all()  # one draw per level: deterministic
