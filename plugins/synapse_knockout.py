"""Synapse knockout (Cheney et al. 2017): zero a random fraction of a layer's weights.

Level p zeroes floor(p·W.numel()) entries of W chosen uniformly at random and, drawn
independently, floor(p·b.numel()) entries of the bias.
"""

from __future__ import annotations

import torch

from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation, count_for, random_subset_mask, zero_entries

LEVELS = tuple(round(0.1 * i, 1) for i in range(11))


def zero_random_entries(tensor: torch.Tensor, fraction: float, generator: torch.Generator) -> None:
    """Zero floor(fraction·numel) uniformly chosen entries of ``tensor`` in place."""
    k = count_for(fraction, tensor.numel())
    if k == 0:
        return
    mask = random_subset_mask(tensor.numel(), k, generator)  # in logical order, whatever the memory layout
    zero_entries(tensor, mask.view(tensor.shape))


class SynapseKnockout(WeightPerturbation):
    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        for tensor in layer.weight_and_bias():
            zero_random_entries(tensor, level, generator)


@hookimpl
def lesionbench_perturbations():
    return [
        SynapseKnockout(
            name="synapse_knockout",
            description="Zero a random fraction p of the layer's weights, and independently of its biases.",
            default_levels=LEVELS,
            level_range=(0.0, 1.0),
            axis=LevelAxis("fraction p of weights zeroed"),
        )
    ]
