"""Bit flips: soft errors in the stored weights, at a given bit error rate.

Level p is the probability that each bit of the layer's stored weights and biases flips,
independently, in the tensor's own dtype (float32, float16, bfloat16 or an integer type such as a
quantised int8 copy). The number of flipped bits is drawn exactly from Binomial(bits, p)
(:func:`lesionbench.perturbation.binomial_count`) and that many
distinct bit positions are chosen uniformly — the same distribution as one coin per bit, without
materialising one. Variants restrict flips to the sign, exponent or mantissa bits of a float.
Levels are a log scale of error rates.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lesionbench.damage import BIT_ERROR_LEVELS as LEVELS
from lesionbench.damage import apply_bit_masks
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation, binomial_count, distinct_positions

# (sign, exponent, mantissa) bit positions, least significant bit = 0
FIELDS = {
    torch.float32: ((31,), tuple(range(23, 31)), tuple(range(0, 23))),
    torch.float16: ((15,), tuple(range(10, 15)), tuple(range(0, 10))),
    torch.bfloat16: ((15,), tuple(range(7, 15)), tuple(range(0, 7))),
}


def eligible_bits(dtype: torch.dtype, field: str) -> tuple[int, ...]:
    """The bit positions a flip may hit in ``dtype`` for ``field`` (all, sign, exponent, mantissa)."""
    width = torch.empty((), dtype=dtype).element_size() * 8
    if field == "all":
        return tuple(range(width))
    if dtype not in FIELDS:
        raise ValueError(f"bit field {field!r} needs a floating-point tensor, not {dtype}")
    return FIELDS[dtype][("sign", "exponent", "mantissa").index(field)]


def flip_bits(tensor: torch.Tensor, rate: float, generator: torch.Generator, field: str = "all") -> int:
    """Flip each eligible bit of ``tensor`` with probability ``rate``, in place; returns the count."""
    bits = eligible_bits(tensor.dtype, field)
    total = tensor.numel() * len(bits)
    if rate == 0 or total == 0:
        return 0
    count = binomial_count(total, rate, generator)
    if count == 0:
        return 0
    chosen = (
        torch.randperm(total, generator=generator)[:count]
        if count > total // 8
        else distinct_positions(total, count, generator)
    )
    element, which = chosen // len(bits), torch.tensor(bits, dtype=torch.int64)[chosen % len(bits)]
    masks = torch.zeros(tensor.numel(), dtype=torch.int64)
    masks.index_put_((element,), torch.ones_like(which) << which, accumulate=True)  # distinct bits: sum = or
    apply_bit_masks(tensor, masks, "xor")
    return count


class BitFlip(WeightPerturbation):
    field: ClassVar[str] = "all"

    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        for tensor in layer.weight_and_bias():
            flip_bits(tensor, level, generator, self.field)


def _variant(field: str) -> type[BitFlip]:
    return type(f"BitFlip_{field}", (BitFlip,), {"field": field})


@hookimpl
def lesionbench_perturbations():
    out = []
    for field in ("all", "sign", "exponent", "mantissa"):
        name = "bit_flip" if field == "all" else f"bit_flip_{field}"
        which = "every bit" if field == "all" else f"each {field} bit"
        out.append(
            _variant(field)(
                name=name,
                description=f"Flip {which} of the stored weights and biases with probability p (bit error rate).",
                default_levels=LEVELS,
                level_range=(0.0, 1.0),
                axis=LevelAxis("bit error rate p", scale="log"),  # decades: scored over log10 p
            )
        )
    return out
