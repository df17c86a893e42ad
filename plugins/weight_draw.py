"""Weight draw (from Cheney et al.'s own code): replace a random fraction of a layer's weights by
values drawn from the same tensor.

Level p replaces floor(p·W.numel()) entries of W, chosen uniformly at random, by as many of W's
original entries drawn uniformly *without* replacement, as the authors' ``perturb_weights.py``
(kreimanlab/neural_net_robustness) does with ``random.sample``: at p = 1 the layer's weights are a
random permutation of themselves. The bias is treated the same way on its own. The layer keeps its
weight distribution but loses the arrangement that carried what it learned. (Runs made before this
change drew the values with replacement: their weight_draw rows differ.)
"""

from __future__ import annotations

import torch

from lesionbench.damage import FRACTION_LEVELS as LEVELS
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation, count_for, positions_mask


def redraw_entries(tensor: torch.Tensor, fraction: float, generator: torch.Generator) -> None:
    """Replace floor(fraction·numel) random entries by as many distinct entries of the tensor (drawn
    without replacement, the authors' ``random.sample``), in place."""
    n = tensor.numel()
    k = count_for(fraction, n)
    if k == 0:
        return
    values = tensor.detach().reshape(-1).cpu()  # a copy when not contiguous; the original values
    positions = torch.randperm(n, generator=generator)[:k]
    sources = torch.randperm(n, generator=generator)[:k]
    replacement = torch.zeros(n, dtype=tensor.dtype)
    replacement[positions] = values[sources].to(tensor.dtype)
    tensor.copy_(
        torch.where(positions_mask(tensor, positions), replacement.view(tensor.shape).to(tensor.device), tensor)
    )


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
