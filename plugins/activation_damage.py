"""Activation damage: perturb what a layer computes rather than what it stores.

Both act through a forward hook on the layer and leave its weights untouched. A *unit* is an output channel of a conv (dim 1 of [N, C, ...]) or an output
feature of a linear layer (the last dim).

- ``activation_knockout``: for each image independently, zero floor(p·units) units chosen
  uniformly at random — the whole channel at every position (every token for a linear layer).
  It is node knockout done per image: the network cannot rely on which units survive.
- ``activation_noise``: add N(0, (p·σ)²) to every output value, σ being the standard deviation of
  the layer's clean output for that image (over its units and positions). Per image, so that the
  numbers do not depend on how the evaluation set is cut into batches.

Masks and noise are drawn on the CPU from the cell's generator at every forward call, so a cell
is reproducible given the order of its batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lesionbench.damage import FRACTION_LEVELS as FRACTIONS
from lesionbench.damage import NOISE_LEVELS
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import HookPerturbation, LevelAxis, count_for

Hook = Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]


def unit_dim(layer: Layer, output: torch.Tensor) -> int:
    """Where the units are: channels (dim 1) of a conv output, features (last dim) of a linear one."""
    return output.dim() - 1 if layer.kind == "linear" else 1


def knockout_hook(layer: Layer, fraction: float, generator: torch.Generator) -> Hook:
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        dim = unit_dim(layer, output)
        n, units = output.shape[0], output.shape[dim]
        k = count_for(fraction, units)
        if k == 0:
            return None
        chosen = torch.rand(n, units, generator=generator).argsort(dim=1)[:, :k]  # a random k per image
        drop = torch.zeros(n, units, dtype=torch.bool).scatter_(1, chosen, True)
        shape = [n] + [1] * (output.dim() - 1)
        shape[dim] = units
        return output.masked_fill(drop.view(shape).to(output.device), 0)

    return hook


def noise_hook(level: float, generator: torch.Generator) -> Hook:
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if output[0].numel() < 2:
            return None
        sigma = output.detach().float().flatten(1).std(dim=1).view([-1] + [1] * (output.dim() - 1))
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output.device)
        return output + (noise * (level * sigma)).to(output.dtype)

    return hook


class ActivationKnockout(HookPerturbation):
    def hooks(self, layer: Layer, level: float, generator: torch.Generator) -> list[RemovableHandle]:
        if level == 0:
            return []
        return [layer.output_module.register_forward_hook(knockout_hook(layer, level, generator))]


class ActivationNoise(HookPerturbation):
    def hooks(self, layer: Layer, level: float, generator: torch.Generator) -> list[RemovableHandle]:
        if level == 0:
            return []
        return [layer.output_module.register_forward_hook(noise_hook(level, generator))]


@hookimpl
def lesionbench_perturbations():
    return [
        ActivationKnockout(
            name="activation_knockout",
            description="Zero a random fraction p of the layer's output units, afresh for each image (weights untouched).",
            default_levels=FRACTIONS,
            level_range=(0.0, 1.0),
            axis=LevelAxis("fraction p of output units zeroed per image"),
        ),
        ActivationNoise(
            name="activation_noise",
            description="Add Gaussian noise of std p·σ to the layer's output, σ its std over the batch (weights untouched).",
            default_levels=NOISE_LEVELS,
            level_range=(0.0, 2.0),
            axis=LevelAxis("noise std p (× std of the output)"),
        ),
    ]
