"""Sign flip: negate floor(p·n) randomly chosen weights of a layer (biases untouched).

An example of a third-party lesionbench plugin, using only the public surface of ``lesionbench``.
"""

from __future__ import annotations

import torch

from lesionbench import Layer, LevelAxis, WeightPerturbation, count_for, hookimpl, random_subset_mask


class SignFlip(WeightPerturbation):
    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        weight = layer.module.weight
        k = count_for(level, weight.numel())
        if k:
            mask = random_subset_mask(weight.numel(), k, generator).view(weight.shape).to(weight.device)
            weight[mask] = -weight[mask]


@hookimpl
def lesionbench_perturbations():
    return [
        SignFlip(
            name="sign_flip",
            description="Negate a random fraction p of the layer's weights.",
            default_levels=(0.0, 0.25, 0.5, 0.75, 1.0),
            level_range=(0.0, 1.0),
            axis=LevelAxis("fraction p of weights negated"),
        )
    ]
