"""Random draws of damage: how many entries, which ones, and zeroing them by mask.

The primitives weight perturbations build on, public through :mod:`lesionbench.perturbation` (and
:mod:`lesionbench`, where a plugin imports them): each draws its randomness from the CPU
:class:`torch.Generator` it is given (:func:`lesionbench.perturbation.generator_for`), so a cell's
damage is the same on any device, and counts positions in a tensor's logical (row-major) order.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch


def count_for(fraction: float, size: int) -> int:
    """floor(fraction·size), immune to float round-off such as 0.7·10 = 7.000000000000001."""
    return int(math.floor(round(fraction * size, 9)))


def positions_mask(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A boolean mask shaped like ``tensor`` (on its device), True at the given flat positions.

    Positions count in the tensor's logical (row-major) order, so the same draw hits the same
    entries whatever the memory layout (e.g. channels_last).
    """
    mask = torch.zeros(tensor.numel(), dtype=torch.bool)
    mask[positions] = True
    return mask.view(tensor.shape).to(tensor.device)


PERMUTE_BELOW = 1 << 21  # entries (2.1M: above every committed result's tensors); see random_subset_mask


def random_subset_mask(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A flat boolean mask with exactly ``k`` of ``n`` entries True, every k-subset equally likely.

    Below 2M entries: the first k of a random permutation. Above, a permutation costs seconds (1.5 s
    for the 37.7M weights of AlexNet's fc6), so instead one coin per entry with probability about
    k/n (8 random bits each, 7 coins per 64-bit draw: a fifth of the generator calls of
    ``torch.rand``), then the surplus or shortfall removed or added at random positions. The result
    does not change in distribution when positions are permuted and always has k entries, so it is
    uniform over k-subsets, as the permutation is.
    """
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0, dtype=torch.bool)
    if n < PERMUTE_BELOW:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[:k]] = True
        return mask
    threshold = round(256 * k / n)
    if threshold in (0, 256):  # every coin would land the same way: all the work is in the fix below
        mask = torch.full((n,), threshold == 256, dtype=torch.bool)
    else:
        words = torch.empty((n + 6) // 7, dtype=torch.int64).random_(generator=generator)  # 63 random bits each
        low = slice(0, 7) if sys.byteorder == "little" else slice(1, 8)  # the seven full bytes
        # compared where they lie: the result is a fresh [words, 7] tensor, so no copy of the coins
        mask = torch.lt(words.view(torch.uint8).view(-1, 8)[:, low], threshold).reshape(-1)[:n]
    have = int(torch.count_nonzero(mask))
    if have != k:
        wrong = have > k  # the value of the entries to flip
        need, pool = abs(have - k), have if wrong else n - have
        picked = torch.empty(0, dtype=torch.int64)
        while len(picked) < need:  # distinct positions holding the wrong value, by rejection
            draws = torch.randint(0, n, (int(1.25 * (need - len(picked)) * n / pool) + 64,), generator=generator)
            picked = torch.cat([picked, draws[mask[draws] == wrong]]).unique()
        mask[picked[torch.randperm(len(picked), generator=generator)[:need]]] = not wrong
    return mask


# masked_fill_ by bits: the integer type of each width (a dtype missing here is filled by masked_fill_)
_BITS = {1: (torch.int8, np.int8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32), 8: (torch.int64, np.int64)}
_BY_BITS = {
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
}
ZERO_CHUNK = 1 << 20  # entries per chunk: a 4 MB word mask at float32, which stays in cache


def zero_entries(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """``tensor.masked_fill_(mask, 0)``, bit for bit; on the CPU without a branch per entry.

    ``mask`` is a CPU bool tensor shaped like ``tensor`` (logical order, whatever the layout).
    ``masked_fill_`` on the CPU branches on every entry, and a random mask mispredicts half of those
    branches: 0.19 s for the 37.7M weights of AlexNet's fc6. Here the tensor's bits are ANDed with a
    word per entry that is all ones (kept) or all zeros (zeroed), built from the mask a chunk of
    rows at a time: four times faster. All-zero bits are +0.0 in every IEEE and bfloat16 format and
    0 in every integer type, exactly what ``masked_fill_(mask, 0)`` writes (a zeroed -0.0, NaN or
    Inf becomes +0.0; a kept one is untouched). On other devices and dtypes: ``masked_fill_``.
    """
    if tensor.device.type != "cpu" or tensor.dtype not in _BY_BITS or tensor.dim() == 0:
        tensor.masked_fill_(mask.to(tensor.device), 0)
        return
    bits, np_bits = _BITS[tensor.element_size()]
    flags = mask.numpy().view(np.uint8)  # 1: zero it
    rows = max(1, ZERO_CHUNK // max(1, tensor[0].numel()))
    for start in range(0, tensor.shape[0], rows):
        keep = np.subtract(flags[start : start + rows], 1, dtype=np_bits)  # 1 → 0 (zero), 0 → -1 (all ones)
        tensor[start : start + rows].view(bits).bitwise_and_(torch.from_numpy(keep))


def binomial_count(trials: int, p: float, generator: torch.Generator) -> int:
    """A draw from Binomial(trials, p), exactly, seeded from ``generator``.

    ``torch.binomial`` works in float32: for the 1.2e9 bits of AlexNet's fc6 its variance is
    1.2–1.8× the binomial's and its mean is biased at p = 1e-7. NumPy's generator samples the
    binomial exactly (BTPE / inversion, 64-bit counts); its seed is drawn from ``generator``, so
    the count is as reproducible as any other draw of a cell.
    """
    if trials <= 0 or p <= 0:
        return 0
    if p >= 1:
        return int(trials)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    return int(np.random.default_rng(seed).binomial(int(trials), float(p)))


def distinct_positions(total: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct positions in range(total), uniformly, for count ≪ total (no permutation)."""
    chosen = torch.empty(0, dtype=torch.int64)
    while len(chosen) < count:
        more = torch.randint(0, total, (count - len(chosen),), generator=generator)
        chosen = torch.cat([chosen, more]).unique(sorted=False)
    return chosen[:count]
