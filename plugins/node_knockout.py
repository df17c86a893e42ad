"""Node knockout (Cheney et al. 2017): silence a random fraction of a layer's output units.

Level p silences floor(p·n_out) units: for a conv layer the whole filter and its bias, for a
linear layer the unit's weight row and bias. When the layer feeds a BatchNorm, that channel's
scale and shift (and running mean) are zeroed too, so the unit stays silent after
normalisation instead of emitting the BatchNorm's shift.
"""

from __future__ import annotations

import torch

from benchmark.hookspecs import hookimpl
from benchmark.layers import Layer
from benchmark.perturbation import BasePerturbation, count_for
from plugins.synapse_knockout import LEVELS


def silence_units(layer: Layer, units: torch.Tensor) -> None:
    """Make the given output units of ``layer`` emit zero, through its BatchNorm if it has one."""
    units = units.to(layer.module.weight.device)
    layer.module.weight[units] = 0
    if layer.module.bias is not None:
        layer.module.bias[units] = 0
    norm = layer.norm
    if norm is not None:
        for name in ("weight", "bias", "running_mean"):
            tensor = getattr(norm, name, None)
            if tensor is not None:
                tensor[units] = 0


class NodeKnockout(BasePerturbation):
    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        n = layer.out_units
        k = count_for(level, n)
        if k:
            silence_units(layer, torch.randperm(n, generator=generator)[:k])


@hookimpl
def lesionbench_perturbations():
    return [
        NodeKnockout(
            name="node_knockout",
            description="Silence a random fraction p of the layer's output units (whole filters / rows and their bias).",
            default_levels=LEVELS,
            level_range=(0.0, 1.0),
        )
    ]
