"""Weight quantization: round a layer's weights to k bits, as low-precision inference would.

Level k rounds W symmetrically to k bits: scale = max|w| / (2^(k-1) − 1) and
w ← round(w / scale)·scale, so W takes at most 2^k − 1 values, the largest |w| is kept exactly and
no weight moves by more than scale/2. ``quantize`` uses one scale for the whole tensor,
``quantize_per_channel`` one per output channel (a conv filter, a linear row, a Conv1D column), as
deployment toolchains do. The bias is left in full precision (it is kept in 32 bits in practice).
A channel that is all zeros has scale 0 and stays zero. Levels are bit widths, and damage grows as
the level *decreases*; the draws are all equal (no randomness).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation

LEVELS = (8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0)


def quantize_(tensor: torch.Tensor, bits: int, per_channel: bool = False) -> None:
    """Round ``tensor`` in place to ``bits``-bit symmetric levels, per tensor or per dim-0 channel.

    The rounding is PyTorch's own fake quantization (``torch.fake_quantize_per_tensor_affine`` /
    ``_per_channel_affine``, zero point 0, integer range ±(2^(bits−1) − 1)), as quantization-aware
    tooling computes it: x·(1/scale) rounded half to even. (The hand-written x / scale it replaced
    resolved a half-way tie differently for one weight in 4 of the 1,190 tensor × bit-width
    combinations of the shipped nets.)
    """
    w = tensor.detach().float()
    qmax = 2 ** (bits - 1) - 1
    if per_channel and w.dim() > 1:
        amax = w.abs().amax(dim=tuple(range(1, w.dim())))
    else:
        amax = w.abs().amax()
    scale = amax / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: stays zero, not NaN
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    if scale.dim():
        out = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax, qmax)
    else:
        out = torch.fake_quantize_per_tensor_affine(w, scale, zero, -qmax, qmax)
    tensor.copy_(out)


class Quantize(WeightPerturbation):
    per_channel: ClassVar[bool] = False

    def check_level(self, level: float) -> None:
        """Checked for every level before a study starts."""
        if level != int(level):
            raise LesionbenchError(f"{self.name} takes a whole number of bits, not {level}")

    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        self.check_level(level)
        quantize_(layer.weight_by_unit(), int(level), self.per_channel)  # a view: channels are output units


class QuantizePerChannel(Quantize):
    per_channel: ClassVar[bool] = True


@hookimpl
def lesionbench_perturbations():
    # fewer bits, more harm; no randomness, so the harness evaluates one draw per level
    common = dict(
        default_levels=LEVELS,
        level_range=(2.0, 16.0),
        identity_level=None,
        deterministic=True,
        axis=LevelAxis("bit width k", damage_grows=False),
    )
    return [
        Quantize(
            name="quantize",
            description="Round the weights to k bits, symmetric, one scale per tensor (bias kept in full precision).",
            **common,
        ),
        QuantizePerChannel(
            name="quantize_per_channel",
            description="Round the weights to k bits, symmetric, one scale per output channel (bias in full precision).",
            **common,
        ),
    ]
