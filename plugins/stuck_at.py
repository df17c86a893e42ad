"""Stuck-at faults: a random fraction of a layer's stored weights stuck at a fixed bit pattern.

- ``stuck_at_zero``: floor(p·numel) weights (and, drawn independently, biases) read as 0 — in
  distribution the same as synapse knockout, named here in the fault-model vocabulary;
- ``stuck_at_one``: floor(p·numel) weights (and biases) each get one uniformly chosen bit of their
  stored pattern forced to 1 (in the tensor's own dtype), the classic stuck-at-1 memory fault; a
  forced exponent bit can turn a weight into a huge value or NaN/Inf.
"""

from __future__ import annotations

import torch

from lesionbench.damage import FRACTION_LEVELS as LEVELS
from lesionbench.damage import apply_bit_masks, zero_random_entries
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation, count_for


def force_one_bit(tensor: torch.Tensor, fraction: float, generator: torch.Generator) -> None:
    """For floor(fraction·numel) random entries, set one random bit of the stored pattern to 1."""
    n = tensor.numel()
    k = count_for(fraction, n)
    if k == 0:
        return
    width = tensor.element_size() * 8
    entries = torch.randperm(n, generator=generator)[:k]
    bits = torch.randint(0, width, (k,), generator=generator)
    masks = torch.zeros(n, dtype=torch.int64)
    masks[entries] = torch.ones(k, dtype=torch.int64) << bits
    apply_bit_masks(tensor, masks, "or")


class StuckAtZero(WeightPerturbation):
    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        for tensor in layer.weight_and_bias():
            zero_random_entries(tensor, level, generator)


class StuckAtOne(WeightPerturbation):
    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        for tensor in layer.weight_and_bias():
            force_one_bit(tensor, level, generator)


@hookimpl
def lesionbench_perturbations():
    return [
        StuckAtZero(
            name="stuck_at_zero",
            description="A random fraction p of the stored weights and biases stuck at 0.",
            default_levels=LEVELS,
            level_range=(0.0, 1.0),
            axis=LevelAxis("fraction p of weights stuck at 0"),
        ),
        StuckAtOne(
            name="stuck_at_one",
            description="A random fraction p of the stored weights and biases with one random bit stuck at 1.",
            default_levels=(0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
            level_range=(0.0, 1.0),
            # an exponent bit stuck at 1 is catastrophic: the interesting fractions span decades
            axis=LevelAxis("fraction p of weights with a bit stuck at 1", scale="log"),
        ),
    ]
