"""Synapse knockout (Cheney et al. 2017): zero a random fraction of a layer's weights.

Level p zeroes floor(p·W.numel()) entries of W chosen uniformly at random and, drawn
independently, floor(p·b.numel()) entries of the bias.
"""

from __future__ import annotations

import torch

from lesionbench.damage import FRACTION_LEVELS as LEVELS
from lesionbench.damage import zero_random_entries
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation


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
