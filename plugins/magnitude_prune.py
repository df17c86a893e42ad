"""Magnitude pruning: zero the smallest-magnitude fraction of a layer's weights.

Level p zeroes the floor(p·W.numel()) entries of W with the smallest |w| (ties broken by position,
so the result is fully determined); the bias is left alone, as in pruning practice. It is the
informed baseline against which random synapse knockout is compared: the same number of zeros,
chosen to do the least harm.
"""

from __future__ import annotations

import torch

from lesionbench.damage import FRACTION_LEVELS as LEVELS
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation, count_for, positions_mask


def prune_smallest(tensor: torch.Tensor, fraction: float) -> None:
    """Zero the floor(fraction·numel) entries of smallest magnitude, in place."""
    n = tensor.numel()
    k = count_for(fraction, n)
    if k == 0:
        return
    order = torch.sort(tensor.detach().abs().reshape(-1).cpu(), stable=True).indices
    tensor.masked_fill_(positions_mask(tensor, order[:k]), 0)


class MagnitudePrune(WeightPerturbation):
    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        prune_smallest(layer.module.weight, level)


@hookimpl
def lesionbench_perturbations():
    return [
        MagnitudePrune(
            name="magnitude_prune",
            description="Zero the fraction p of the weights with the smallest |w| (biases untouched).",
            default_levels=LEVELS,
            level_range=(0.0, 1.0),
            axis=LevelAxis("fraction p of weights pruned (smallest |w|)"),
        )
    ]
