"""Weight draw (from Cheney et al.'s own code): replace a random fraction of a layer's weights by
values drawn from the same tensor.

Level p replaces floor(p·W.numel()) entries of W, chosen uniformly at random, by values drawn
uniformly with replacement from W's original entries; the bias is treated the same way on its own.
The layer keeps its weight distribution but loses the arrangement that carried what it learned.
"""

from __future__ import annotations

import torch

from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation, count_for, positions_mask
from lesionbench.plugins.synapse_knockout import LEVELS


def redraw_entries(tensor: torch.Tensor, fraction: float, generator: torch.Generator) -> None:
    """Replace floor(fraction·numel) random entries by draws (with replacement) from the tensor."""
    n = tensor.numel()
    k = count_for(fraction, n)
    if k == 0:
        return
    values = tensor.detach().reshape(-1).cpu()  # a copy when not contiguous; the original values
    positions = torch.randperm(n, generator=generator)[:k]
    sources = torch.randint(0, n, (k,), generator=generator)
    replacement = torch.zeros(n, dtype=tensor.dtype)
    replacement[positions] = values[sources].to(tensor.dtype)
    tensor.copy_(torch.where(positions_mask(tensor, positions), replacement.view(tensor.shape).to(tensor.device), tensor))


class WeightDraw(WeightPerturbation):
    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        for tensor in layer.weight_and_bias():
            redraw_entries(tensor, level, generator)


@hookimpl
def lesionbench_perturbations():
    return [
        WeightDraw(
            name="weight_draw",
            description="Replace a random fraction p of the weights (and biases) by values drawn from the same tensor.",
            default_levels=LEVELS,
            level_range=(0.0, 1.0),
            axis=LevelAxis("fraction p of weights redrawn"),
        )
    ]
