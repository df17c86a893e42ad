"""Node knockout (Cheney et al. 2017): silence a random fraction of a layer's output units.

Level p silences floor(p·n_out) units: for a conv layer the whole filter and its bias, for a
linear layer the unit's weight row and bias (a column of transformers' ``Conv1D``, whose weight is
stored [in, out]). When the layer feeds a BatchNorm (directly or
through elementwise activations, pooling, reshapes, concatenations and channel slices; every one,
for a module used more than once), the channel that carries the unit there has its scale and
shift (and running mean) zeroed too, so the unit stays silent after normalisation instead of
emitting the BatchNorm's shift. A unit added to another value (a residual sum) is silenced in its
own output only: zeroing the BatchNorm after the sum would silence the other branch too.
"""

from __future__ import annotations

import torch

from lesionbench.damage import FRACTION_LEVELS as LEVELS
from lesionbench.damage import silence_units
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation, count_for


class NodeKnockout(WeightPerturbation):
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
            axis=LevelAxis("fraction p of units silenced"),
        )
    ]
