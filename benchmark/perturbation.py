"""What a perturbation is, how it is applied in place and undone, and how each cell is seeded.

A perturbation changes one layer's tensors in place; :func:`perturbed` snapshots only the tensors
of the modules it may touch (the layer and the BatchNorm it feeds), so a study never deep-copies
a model, and puts them back bit for bit however the block exits.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from benchmark.errors import LesionbenchError
from benchmark.layers import Layer


@runtime_checkable
class Perturbation(Protocol):
    """The interface a perturbation plugin implements."""

    name: str
    description: str
    default_levels: tuple[float, ...]
    level_range: tuple[float, float]
    identity_level: float | None  # the level that leaves a layer untouched, if any

    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> Callable[[], None] | None:
        """Damage ``layer`` in place at ``level``, drawing all randomness from ``generator``.

        A perturbation that acts through forward hooks (activation damage, block removal) returns
        a callable that removes them; :func:`perturbed` calls it on exit.
        """

    # Optional, read with getattr by the harness:
    #   targets(model, layers) -> list[Layer]   what the layer axis is (default: the study's layers)
    #   level_scale: "linear" | "log"            how scores space the levels (default linear)
    #   damage_grows_with_level: bool            False when lower levels do more harm (quantize bits)
    #   deterministic: bool                      True when every draw is the same: one draw per level
    #   check_level(level) -> None               raise LesionbenchError for a level it cannot take
    #   check_layer(layer) -> None               raise LesionbenchError for a layer it cannot perturb


@dataclass(frozen=True)
class BasePerturbation:
    """Convenience base: fields and level checking; subclasses write :meth:`apply`."""

    name: str
    description: str
    default_levels: tuple[float, ...]
    level_range: tuple[float, float]
    identity_level: float | None = 0.0

    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> Callable[[], None] | None:
        raise NotImplementedError


def level_axis(perturbation: Perturbation) -> str:
    """How scores read this perturbation's levels: ``linear`` (damage grows with the level),
    ``log`` (error rates spanning decades) or ``descending`` (damage grows as the level falls, e.g. bits)."""
    if getattr(perturbation, "level_scale", "linear") == "log":
        return "log"
    return "linear" if getattr(perturbation, "damage_grows_with_level", True) else "descending"


def check_levels(perturbation: Perturbation, levels: Sequence[float]) -> tuple[float, ...]:
    """Levels as floats, or an error naming the first one outside the perturbation's range."""
    lo, hi = perturbation.level_range
    out = []
    for level in levels:
        if not isinstance(level, (int, float)) or isinstance(level, bool) or not math.isfinite(level):
            raise LesionbenchError(f"level {level!r} for {perturbation.name!r} is not a finite number")
        if not lo <= level <= hi:
            raise LesionbenchError(
                f"level {level} is outside the range [{lo}, {hi}] of perturbation {perturbation.name!r}"
            )
        if float(level) in out:
            raise LesionbenchError(f"level {level} is given twice for perturbation {perturbation.name!r}")
        out.append(float(level))
    return tuple(out)


def cell_seed(study_seed: int, model: str, layer: str, perturbation: str, level: float, draw: int) -> int:
    """A seed that depends only on what the cell is, so results do not depend on run order."""
    key = f"{study_seed}|{model}|{layer}|{perturbation}|{float(level)!r}|{draw}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int) -> torch.Generator:
    """A CPU generator: masks and noise are drawn on the CPU so any device gives the same draws."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


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
        coins = words.view(torch.uint8).view(-1, 8)[:, low].reshape(-1)[:n]
        mask = coins < threshold
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


def distinct_positions(total: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct positions in range(total), uniformly, for count ≪ total (no permutation)."""
    chosen = torch.empty(0, dtype=torch.int64)
    while len(chosen) < count:
        more = torch.randint(0, total, (count - len(chosen),), generator=generator)
        chosen = torch.cat([chosen, more]).unique(sorted=False)
    return chosen[:count]


class Snapshot:
    """Clean copies of the tensors a perturbation of ``layer`` may change (and of ``also``).

    Taken once per block and reused by every cell of it: the clean values are the same for all of
    them, and copying a large layer each cell costs more than damaging it (fc6 of AlexNet: 151 MB).
    """

    def __init__(self, layer: Layer, also: Sequence[nn.Module] = ()) -> None:
        self.layer, self.also = layer, list(also)
        self.modules = list(dict.fromkeys([*layer.modules(), *also]))
        self._saved = [_snapshot(m) for m in self.modules]

    def covers(self, layer: Layer, also: Sequence[nn.Module]) -> bool:
        return self.layer is layer and all(m in self.modules for m in also)

    def restore(self) -> None:
        """Put every tensor object and value back, bit for bit."""
        for module, snapshot in zip(self.modules, self._saved):
            _restore(module, snapshot)


@contextmanager
def perturbed(
    layer: Layer,
    perturbation: Perturbation,
    level: float,
    generator: torch.Generator,
    also: Sequence[nn.Module] = (),
    saved: Snapshot | None = None,
) -> Iterator[bool]:
    """Apply ``perturbation`` to ``layer`` for the duration of the block, then restore it exactly.

    Yields whether the perturbation installed hooks (then the damage is not in the tensors alone).
    ``also`` names further modules whose tensors the block may change (BatchNorm layers whose
    statistics are re-estimated); they are restored too. Hooks the perturbation installed are
    removed first. ``saved``, a :class:`Snapshot` of the clean layer taken earlier, saves copying
    it again.
    """
    if saved is None or not saved.covers(layer, also):
        saved = Snapshot(layer, also)
    undo = None
    try:
        with torch.no_grad():
            undo = perturbation.apply(layer, level, generator)
        yield callable(undo)
    finally:
        if callable(undo):
            undo()
        saved.restore()


def nonfinite_count(layer: Layer) -> int:
    """How many entries of the layer's tensors are NaN or ±Inf (bit flips into the exponent…)."""
    return sum(
        _nonfinite(t)
        for m in layer.modules()
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if t.is_floating_point()
    )


def _nonfinite(tensor: torch.Tensor) -> int:
    """A finite sum proves there is no NaN or Inf (and costs a fiftieth of counting them);
    otherwise count (the sum of large finite values may also overflow)."""
    if bool(torch.isfinite(tensor.detach().sum())):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def _snapshot(module: nn.Module) -> dict:
    return {
        kind: {k: (t, t.detach().clone()) for k, t in getattr(module, kind).items() if t is not None}
        for kind in ("_parameters", "_buffers")
    }


def _restore(module: nn.Module, snapshot: dict) -> None:
    with torch.no_grad():
        for kind, entries in snapshot.items():
            store = getattr(module, kind)
            for key, (original, copy) in entries.items():
                store[key] = original  # undo a plugin that swapped the tensor object
                original.copy_(copy)


def model_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, for proving restoration is exact."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
