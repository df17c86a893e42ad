"""Damage helpers shared by the built-in perturbations, public so that no plugin imports another.

A built-in plugin is one module that depends only on this package's public surface: one plugin's bug
cannot disable another. What two or more of them use lives here — the level grids, random masks,
unit silencing and bit masks — and a third-party perturbation may use it too. Every helper changes
its tensor in place, draws its randomness from the ``generator`` it is given (a CPU
:class:`torch.Generator`, see :func:`lesionbench.perturbation.generator_for`) and works in the
tensor's own dtype and device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lesionbench.draws import count_for, random_subset_mask, zero_entries

if TYPE_CHECKING:
    from lesionbench.layers import Layer

#: Fractions 0, 0.1, …, 1 (11 levels): the grid of Cheney et al. (2017) for synapse and node knockout,
#: and the default of every built-in perturbation whose level is a fraction of a layer's weights or units.
FRACTION_LEVELS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

#: Noise multiples 0, 0.2, …, 2 (11 levels): Cheney et al.'s grid for weight noise, σ multiples of the
#: tensor's own standard deviation.
NOISE_LEVELS: tuple[float, ...] = tuple(round(0.2 * i, 1) for i in range(11))

#: Bit error rates 0 and 1e-7 … 1e-3, one per decade: a log axis (:class:`lesionbench.LevelAxis` ``scale="log"``).
BIT_ERROR_LEVELS: tuple[float, ...] = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)

#: Element size in bytes -> the integer dtype of the same width, to read and write a tensor's stored bits.
INT_VIEW: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_random_entries(tensor: torch.Tensor, fraction: float, generator: torch.Generator) -> None:
    """Zero floor(fraction·numel) entries of ``tensor`` in place, every such subset equally likely.

    Positions count in the tensor's logical (row-major) order, so the same draw zeroes the same entries
    whatever the memory layout. ``fraction`` in [0, 1]; 0 draws nothing from ``generator``.
    """
    k = count_for(fraction, tensor.numel())
    if k == 0:
        return
    mask = random_subset_mask(tensor.numel(), k, generator)  # in logical order, whatever the memory layout
    zero_entries(tensor, mask.view(tensor.shape).to(tensor.device))  # bit-identical to masked_fill_(mask, 0)


def silence_units(layer: Layer, units: torch.Tensor) -> None:
    """Make the given output units of ``layer`` emit zero, through every BatchNorm they feed.

    ``units``: int64 indices [k] of output units (a conv's output channels, a linear layer's output
    features; a column of transformers' ``Conv1D``, whose weight is stored [in, out]). Zeroes each
    unit's weight slice and bias in place, and the scale, shift and running mean of the BatchNorm
    channels that carry it (:meth:`lesionbench.Layer.norm_channels`), so the unit stays silent after
    normalisation instead of emitting the BatchNorm's shift.
    """
    units = units.to(layer.module.weight.device)
    layer.module.weight[layer.unit_index(units)] = 0
    if layer.module.bias is not None:
        layer.module.bias[units] = 0
    for norm, channels in layer.norm_channels(units):
        for name in ("weight", "bias", "running_mean"):
            tensor = getattr(norm, name, None)
            if tensor is not None:
                tensor[channels] = 0


def apply_bit_masks(tensor: torch.Tensor, masks: torch.Tensor, op: str) -> None:
    """XOR (``op="xor"``) or OR (``op="or"``) one int64 mask per element into ``tensor``'s stored bits.

    ``masks``: int64 [numel], in row-major order; only the low ``8·element_size`` bits count (bit 0 is
    the least significant bit of the stored pattern). The tensor keeps its dtype, shape and device; a
    float may become ±Inf or NaN. Raises ValueError for another ``op``, KeyError for an element size
    not in :data:`INT_VIEW`.
    """
    if op not in ("xor", "or"):
        raise ValueError(f"op must be 'xor' or 'or', not {op!r}")
    view_dtype = INT_VIEW[tensor.element_size()]
    flat = tensor.detach().reshape(-1).cpu().view(view_dtype).clone()
    masks = masks.to(view_dtype)
    flat = flat ^ masks if op == "xor" else flat | masks
    tensor.copy_(flat.view(tensor.dtype).view(tensor.shape).to(tensor.device))
