"""Perturbations beyond the paper's three, each checked against its docstring's definition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lesionbench.graph import discover_layers
from lesionbench.perturbation import generator_for, model_checksum, perturbed


def linear_layer(out=64, inp=50):
    torch.manual_seed(0)
    module = nn.Linear(inp, out)
    with torch.no_grad():
        module.weight.copy_(torch.randn(out, inp))  # distinct, non-zero values
        module.bias.copy_(torch.randn(out) + 10)  # a bias distribution unlike the weights'
    (layer,) = discover_layers(module, torch.zeros(1, inp))
    return module, layer


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_weight_draw_replaces_floor_p_size_entries_with_values_of_the_same_tensor(perts, p):
    module, layer = linear_layer()
    w0, b0 = module.weight.clone(), module.bias.clone()
    with perturbed(layer, perts["weight_draw"], p, generator_for(4)):
        w, b = module.weight, module.bias
        changed = w != w0
        k = math.floor(p * w.numel())
        # replaced entries are k (a draw can land on its own value, rarely: allow a few)
        assert k - 5 <= int(changed.sum()) <= k
        assert torch.isin(w, w0).all(), "every weight is a value W had before"
        assert torch.isin(b, b0).all() and not torch.isin(b, w0).any(), "biases drawn from b, not W"
        assert int((b != b0).sum()) <= math.floor(p * b.numel())
    assert torch.equal(module.weight, w0) and torch.equal(module.bias, b0)


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_weight_draw_draws_without_replacement_so_p_1_is_a_permutation(perts, p):
    """The authors' ``random.sample``: no original entry is drawn twice, so the redrawn entries hold
    distinct values (with replacement about k²/2n of the k would repeat: ~400 here at p = 0.5), and
    at p = 1 the weights are a shuffle of themselves."""
    module, layer = linear_layer()
    w0 = module.weight.clone()
    with perturbed(layer, perts["weight_draw"], p, generator_for(4)):
        w = module.weight.clone()
    redrawn = w[w != w0]
    assert len(redrawn) > 0.9 * p * w.numel()
    assert len(torch.unique(redrawn)) == len(redrawn)
    if p == 1.0:
        assert torch.equal(torch.sort(w.flatten()).values, torch.sort(w0.flatten()).values)


def test_weight_draw_is_reproducible_and_differs_between_draws(perts):
    module, layer = linear_layer()

    def draw(seed):
        with perturbed(layer, perts["weight_draw"], 0.5, generator_for(seed)):
            return module.weight.clone()

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("p", [0.0, 0.3, 0.75, 1.0])
def test_magnitude_prune_zeroes_exactly_the_smallest_weights_and_keeps_the_bias(perts, p):
    module, layer = linear_layer()
    w0, b0 = module.weight.clone(), module.bias.clone()
    before = model_checksum(module)
    with perturbed(layer, perts["magnitude_prune"], p, generator_for(0)):
        w = module.weight
        k = math.floor(p * w.numel())
        zeroed = w == 0
        assert int(zeroed.sum()) == k
        if 0 < k < w.numel():
            assert w0.abs()[zeroed].max() <= w0.abs()[~zeroed].min()
        assert torch.equal(w[~zeroed], w0[~zeroed])
        assert torch.equal(module.bias, b0)
    assert model_checksum(module) == before


def test_magnitude_prune_is_kinder_than_random_knockout(perts):
    """Same number of zeros, chosen by size: the output moves less (the reason it is the baseline)."""
    module, layer = linear_layer(out=200, inp=200)
    x = torch.randn(64, 200)
    with torch.no_grad():
        clean = module(x)
        with perturbed(layer, perts["magnitude_prune"], 0.5, generator_for(0)):
            pruned = (module(x) - clean).norm()
        with perturbed(layer, perts["synapse_knockout"], 0.5, generator_for(0)):
            knocked = (module(x) - clean).norm()
    assert pruned < 0.5 * knocked


def bit_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, the XOR of the two tensors' bit patterns (as int64)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return (a.reshape(-1).view(view).to(torch.int64) ^ b.reshape(-1).view(view).to(torch.int64)) & (
        (1 << (8 * a.element_size())) - 1
    )


def popcount(x: torch.Tensor) -> int:
    return sum(bin(int(v)).count("1") for v in x[x != 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_bit_flip_flips_the_expected_number_of_bits_in_the_tensors_own_dtype(dtype):
    from lesionbench.plugins.bit_flip import flip_bits

    torch.manual_seed(0)
    t = (torch.randn(20_000) * 10).to(dtype)
    original = t.clone()
    rate = 1e-3
    n_bits = t.numel() * t.element_size() * 8
    flipped = flip_bits(t, rate, generator_for(3))
    assert popcount(bit_diff(t, original)) == flipped
    mean, sd = n_bits * rate, math.sqrt(n_bits * rate)
    assert abs(flipped - mean) < 5 * sd


@pytest.mark.parametrize(
    "field, keeps", [("sign", "magnitude"), ("exponent", "sign+mantissa"), ("mantissa", "sign+exponent")]
)
def test_bit_flip_fields_touch_only_their_bits(field, keeps):
    from lesionbench.plugins.bit_flip import FIELDS, flip_bits

    t = torch.randn(50_000)
    original = t.clone()
    assert flip_bits(t, 1e-2, generator_for(1), field) > 0
    diff = bit_diff(t, original)
    allowed = sum(1 << b for b in FIELDS[torch.float32][("sign", "exponent", "mantissa").index(field)])
    assert int((diff & ~allowed).abs().sum()) == 0
    assert int((diff != 0).sum()) > 0


def test_bit_flip_perturbation_is_restored_and_reproducible(perts):
    module, layer = linear_layer()
    before = model_checksum(module)
    outs = []
    for _ in range(2):
        with perturbed(layer, perts["bit_flip_exponent"], 1e-2, generator_for(9)):
            outs.append(module.weight.clone())
        assert model_checksum(module) == before
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))


@pytest.mark.parametrize("p", [0.2, 1.0])
def test_stuck_at_one_sets_exactly_one_bit_in_floor_p_size_entries(perts, p):
    module, layer = linear_layer()
    w0 = module.weight.clone()
    before = model_checksum(module)
    with perturbed(layer, perts["stuck_at_one"], p, generator_for(2)):
        diff = bit_diff(module.weight.detach(), w0)
        original_bits = w0.reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        assert int(((diff & original_bits) != 0).sum()) == 0, "only 0 bits become 1"
        changed = diff != 0
        assert all(bin(int(v)).count("1") == 1 for v in diff[changed])
        # an entry whose chosen bit was already 1 does not change: at most floor(p·n), most of them
        k = math.floor(p * w0.numel())
        assert 0.3 * k <= int(changed.sum()) <= k
    assert model_checksum(module) == before


def test_stuck_at_zero_matches_synapse_knockout_counts(perts):
    module, layer = linear_layer()
    with perturbed(layer, perts["stuck_at_zero"], 0.4, generator_for(5)):
        assert int((module.weight == 0).sum()) == math.floor(0.4 * module.weight.numel())
        assert int((module.bias == 0).sum()) == math.floor(0.4 * module.bias.numel())
