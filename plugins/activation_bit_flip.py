"""Transient faults in activations: bit flips in what a layer computes, afresh for every image.

The fault models of hardware-reliability tools (PyTorchFI, TensorFI, MRFI), as forward hooks on
the layer: its weights are never touched, and the layer's output is damaged at every forward call.

- ``activation_bit_flip``: each bit of each output value flips independently with probability p
  (the bit error rate; levels on a log scale). For every image, the number of flipped bits is
  drawn from Binomial(values per image × bit width, p) and that many distinct bit positions are
  chosen uniformly — the same distribution as one coin per bit, without drawing one.
- ``activation_bit_flip_single``: level k (whole, default 1) flips k bits per image, each in a
  different output value chosen uniformly, at a bit position chosen uniformly: k = 1 is
  PyTorchFI's single-bit-flip fault model (one random bit of one random neuron per image), the
  one its users run most. It is random (a fresh fault per image and draw), so the harness draws
  it as often as the study asks.

Bits are flipped in the output's own dtype: float32 (32 bits), float16/bfloat16 (16), and for a
quantized int8 model the 8 bits of the stored activation code (``int_repr()``, then rebuilt with the
same scale and zero point). A flip in a float's exponent can make a value huge, NaN or Inf; the
harness counts such values in the layer's output (``nonfinite_outputs`` in the results).

Randomness: when the hooks are installed, one 63-bit seed is drawn from the cell's torch
generator and seeds a NumPy ``Generator`` (PCG64), which makes every draw after it, image by image
in evaluation order. Counts use NumPy's exact binomial sampler (``torch.binomial`` in float32
loses variance for large counts). Because the draws go image by image, a cell's faults do not
depend on how the evaluation set is cut into batches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lesionbench import HookPerturbation, Layer, LesionbenchError, LevelAxis, hookimpl
from lesionbench.damage import BIT_ERROR_LEVELS as LEVELS
from lesionbench.damage import INT_VIEW

Hook = Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]
SEED_BOUND = (1 << 63) - 1


def numpy_generator(generator: torch.Generator) -> np.random.Generator:
    """A NumPy generator seeded with one 63-bit draw from ``generator`` (a torch CPU generator)."""
    return np.random.default_rng(int(torch.randint(0, SEED_BOUND, (), generator=generator)))


def stored_bits(output: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A row-major copy of the bits that hold ``output``'s values, and a function rebuilding an
    output from it.

    Float outputs are copied as they are; a quantized output stores its integer codes
    (``int_repr()``), rebuilt with the same scale and zero point. Raises LesionbenchError for any
    other dtype (integer outputs of a Conv/Linear do not occur).
    """
    if output.is_quantized:
        if output.qscheme() != torch.per_tensor_affine:
            raise LesionbenchError(f"activation bit flips need a per-tensor quantized output, not {output.qscheme()}")
        scale, zero_point = output.q_scale(), output.q_zero_point()
        codes = output.int_repr().contiguous()
        return codes, lambda c: torch._make_per_tensor_quantized_tensor(c, scale, zero_point)
    if not output.is_floating_point():
        raise LesionbenchError(f"activation bit flips need a floating-point or quantized output, not {output.dtype}")
    return output.detach().clone(memory_format=torch.contiguous_format), lambda values: values


def flip_bits_per_image(output: torch.Tensor, draw: Callable[[int, int], np.ndarray]) -> torch.Tensor:
    """``output`` with the bits ``draw`` picks flipped, image by image (a new tensor).

    ``output`` is [images, ...] (any dtype :func:`stored_bits` takes). ``draw(values, width)`` is
    called once per image, in order, and returns distinct bit positions in range(values × width),
    position j being bit j % width (0 = least significant) of the image's value j // width (values
    in row-major order). Only the values hit are written, on the output's device.
    """
    storage, rebuild = stored_bits(output)
    per_image = storage[0].numel() if len(storage) else 0
    width = storage.element_size() * 8
    chosen = [i * per_image * width + draw(per_image, width).astype(np.int64) for i in range(len(storage))]
    position = torch.from_numpy(np.concatenate(chosen)) if chosen else torch.empty(0, dtype=torch.int64)
    if not len(position):
        return output
    element, inverse = torch.unique(position // width, return_inverse=True)
    masks = torch.zeros(len(element), dtype=torch.int64).index_add_(
        0, inverse, torch.ones_like(position) << (position % width)
    )
    ints = storage.view(INT_VIEW[storage.element_size()]).view(-1)  # the same memory, as integers
    device = ints.device
    ints[element.to(device)] ^= masks.to(ints.dtype).to(device)  # distinct bits per value: their sum is their or
    return rebuild(storage)


def bit_error_hook(rate: float, rng: np.random.Generator) -> Hook:
    """Each image: Binomial(values × width, rate) distinct bits, uniformly."""

    def draw(values: int, width: int) -> np.ndarray:
        n_bits = values * width
        return rng.choice(n_bits, size=rng.binomial(n_bits, rate), replace=False)

    return lambda _module, _inputs, output: flip_bits_per_image(output, draw)


def single_fault_hook(faults: int, rng: np.random.Generator) -> Hook:
    """Each image: ``faults`` distinct values (all if fewer), one uniformly chosen bit of each."""

    def draw(values: int, width: int) -> np.ndarray:
        chosen = rng.choice(values, size=min(faults, values), replace=False)
        return chosen * width + rng.integers(0, width, size=len(chosen))

    return lambda _module, _inputs, output: flip_bits_per_image(output, draw)


def bits_check_hooks(_perturbation: HookPerturbation, layer: Layer) -> list[RemovableHandle]:
    """Before the study: the layer's output must be one whose bits can be flipped (:func:`stored_bits`)."""

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        try:
            stored_bits(output)
        except LesionbenchError as exc:
            raise LesionbenchError(f"layer {layer.display!r}: {exc}") from None

    return [layer.output_module.register_forward_hook(hook)]


class ActivationBitFlip(HookPerturbation):
    check_hooks = bits_check_hooks

    def hooks(self, layer: Layer, level: float, generator: torch.Generator) -> list[RemovableHandle]:
        if level == 0:
            return []
        return [layer.output_module.register_forward_hook(bit_error_hook(level, numpy_generator(generator)))]


class ActivationBitFlipSingle(HookPerturbation):
    check_hooks = bits_check_hooks

    def check_level(self, level: float) -> None:
        """Checked for every level before a study starts."""
        if level != int(level):
            raise LesionbenchError(f"{self.name} takes a whole number of faults per image, not {level}")

    def hooks(self, layer: Layer, level: float, generator: torch.Generator) -> list[RemovableHandle]:
        self.check_level(level)
        if level == 0:
            return []
        return [layer.output_module.register_forward_hook(single_fault_hook(int(level), numpy_generator(generator)))]


@hookimpl
def lesionbench_perturbations():
    return [
        ActivationBitFlip(
            name="activation_bit_flip",
            description="Flip each bit of the layer's output values with probability p, afresh for each image (weights untouched).",
            default_levels=LEVELS,
            level_range=(0.0, 1.0),
            axis=LevelAxis("activation bit error rate p", scale="log"),
        ),
        ActivationBitFlipSingle(
            name="activation_bit_flip_single",
            description="Flip one random bit in each of k random output values per image (k = 1: PyTorchFI's single bit flip).",
            default_levels=(1.0,),
            level_range=(0.0, 1024.0),
            axis=LevelAxis("single-bit faults per image k"),
        ),
    ]
