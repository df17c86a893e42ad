"""Weight noise (Cheney et al. 2017): add Gaussian noise scaled to each tensor's own spread.

Level p adds N(0, (p·std(W))²) to every weight and, separately, N(0, (p·std(b))²) to every
bias; std is the population standard deviation (ddof 0, the authors' ``np.std`` in
kreimanlab/neural_net_robustness ``perturb_weights.py``) of the unperturbed tensor. A one-element bias has no spread and is left
as it is. Integer tensors (an int8 model's stored codes) get the noise added to the code, rounded
to the nearest code and saturated at the dtype's range.
"""

from __future__ import annotations

import torch

from lesionbench.damage import NOISE_LEVELS as LEVELS
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation

NOISE_CHUNK = 1 << 20  # entries drawn at a time into one buffer (4 MB): a multiple of 16, see below


def add_scaled_noise(tensor: torch.Tensor, level: float, generator: torch.Generator) -> None:
    """tensor += N(0, (level·std(tensor))²), drawn on the CPU from ``generator``."""
    if tensor.numel() < 2 or level == 0:
        return
    std = tensor.detach().float().std(correction=0).item()  # np.std, as the authors' code
    if tensor.is_floating_point() and tensor.device.type == "cpu" and tensor.is_contiguous():
        _add_noise_in_chunks(tensor.view(-1), level * std, generator)
        return
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).mul_(level * std)  # in place: no
    if tensor.is_floating_point():  # second 151 MB buffer for AlexNet's fc6
        tensor.add_(noise.to(device=tensor.device, dtype=tensor.dtype))
        return
    # integer codes (an int8 model's stored weights): the noisy value rounded to the nearest code and
    # saturated at the dtype's range, as integer arithmetic in hardware does (never wrapped around)
    info = torch.iinfo(tensor.dtype)
    noisy = tensor.float().add_(noise.to(tensor.device)).round_().clamp_(info.min, info.max)
    tensor.copy_(noisy.to(tensor.dtype))


def _add_noise_in_chunks(flat: torch.Tensor, scale: float, generator: torch.Generator) -> None:
    """``flat += torch.randn(len(flat)).mul_(scale)``, bit for bit, drawn a chunk at a time.

    The CPU's ``normal_`` fills a float32 tensor of 16 entries or more with uniforms in order, turns
    them into normals 16 at a time (Box-Muller on entries i and i+8 of each block) and, when the
    size is not a multiple of 16, draws 16 more uniforms for the last 16 entries. Chunks whose sizes
    are multiples of 16, the last one at least 16 long, therefore draw the very numbers of one call
    (pinned by golden values in the tests). No 151 MB noise tensor at AlexNet's fc6: a 4 MB buffer
    reused, which spares the page faults of a fresh one and keeps the scaling and adding in cache.
    """
    n = len(flat)
    buffer = torch.empty(min(n, NOISE_CHUNK + 15), dtype=torch.float32)
    start = 0
    while start < n:
        end = n if n - start < NOISE_CHUNK + 16 else start + NOISE_CHUNK  # the last chunk takes the tail
        noise = buffer[: end - start].normal_(generator=generator).mul_(scale)
        flat[start:end].add_(noise.to(flat.dtype))
        start = end


class WeightNoise(WeightPerturbation):
    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        for tensor in layer.weight_and_bias():
            add_scaled_noise(tensor, level, generator)


@hookimpl
def lesionbench_perturbations():
    return [
        WeightNoise(
            name="weight_noise",
            description="Add Gaussian noise with std p·std(W) to the weights and p·std(b) to the biases.",
            default_levels=LEVELS,
            level_range=(0.0, 2.0),
            axis=LevelAxis("noise std p (× std of W)"),
        )
    ]
