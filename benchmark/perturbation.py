"""What a perturbation is, how it is applied in place and undone, and how each cell is seeded.

A perturbation changes one layer's tensors in place; :func:`perturbed` snapshots only the tensors
of the modules it may touch (the layer and the BatchNorm it feeds), so a study never deep-copies
a model, and puts them back bit for bit however the block exits.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lesionbench.errors import LesionbenchError
from lesionbench.kinds import (
    DESCENDING, HOOKS, LINEAR, LOG, WEIGHTS, AxisScale, PerturbationKind, axis_scale, perturbation_kind,
)
from lesionbench.layers import Layer


@dataclass(frozen=True)
class LevelAxis:
    """How a perturbation's levels are read: declared once, used by scores, plot axes and tables.

    ``label`` names the level with its unit (``"fraction p of weights zeroed"``, ``"bit error
    rate"``, ``"σ multiple"``, ``"bits k"``); ``scale`` is :data:`lesionbench.kinds.LINEAR` or
    :data:`lesionbench.kinds.LOG` (error rates spanning decades, scored over log10 p so every decade
    weighs the same), given as the scale or its name (``"linear"``, ``"log"``); ``damage_grows`` is
    False when fewer is worse (bit widths: the axis then runs from many bits to few). An unknown scale
    name raises LesionbenchError.
    """

    label: str = "fraction p"
    scale: AxisScale = LINEAR
    damage_grows: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", axis_scale(self.scale))  # "log" (lesionbench 0.1) -> LOG

    @property
    def kind(self) -> AxisScale:
        """The axis as results record it in ``level_axis`` (its ``name``): LINEAR, LOG or DESCENDING."""
        if self.scale == LOG:
            return LOG
        return self.scale if self.damage_grows else DESCENDING


FRACTION = LevelAxis("fraction p")


@dataclass(frozen=True)
class Perturbation:
    """What every perturbation declares; subclass :class:`WeightPerturbation` or :class:`HookPerturbation`.

    ``default_levels`` are used unless a study gives its own; every level must lie in
    ``level_range``. ``identity_level`` is the level that leaves a layer untouched (evaluated
    once, as the clean model), None if there is none. ``deterministic`` perturbations draw no
    random numbers, so the harness evaluates one draw per level. ``axis`` says how to read levels.
    """

    name: str
    description: str
    default_levels: tuple[float, ...]
    level_range: tuple[float, float]
    identity_level: float | None = 0.0
    axis: LevelAxis = FRACTION
    deterministic: bool = False

    # How the damage is done (WEIGHTS or HOOKS), set by the two bases; "weights"/"hooks" are accepted too
    kind: ClassVar[PerturbationKind | None] = None

    def check_level(self, level: float) -> None:
        """Raise :class:`LesionbenchError` for a level this perturbation cannot take (called for
        every level before a study starts; the range is checked by the harness)."""

    def check_layer(self, layer: Layer) -> None:
        """Raise :class:`LesionbenchError` for a layer this perturbation cannot damage (called for
        every layer before a study starts)."""

    def check_hooks(self, layer: Layer) -> list[RemovableHandle]:
        """Forward hooks on the clean model that refuse, before a study starts, a layer this
        perturbation cannot damage for what it computes (a block that changes its input's shape, an
        output whose dtype the damage cannot hold): each raises :class:`LesionbenchError` naming the
        layer and changes nothing. The harness installs them on every layer (target), runs one
        example through the model and removes them (:func:`lesionbench.plan.check_by_forward`).
        Return their handles; none by default."""
        return []

    def targets(self, model: nn.Module, layers: Sequence[Layer]) -> Sequence[Layer] | None:
        """The layer axis, when it is not the study's layers (e.g. residual stages); None: the layers."""
        return None


class WeightPerturbation(Perturbation):
    """Damage done to the layer's stored tensors, in place; the harness restores them bit for bit."""

    kind: ClassVar[PerturbationKind | None] = WEIGHTS

    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        """Damage ``layer``'s tensors in place at ``level``, drawing all randomness from ``generator``.

        May change the layer's parameters and buffers and those of ``layer.norms``; nothing else.
        An exception fails this cell only (its row records the error).
        """
        raise NotImplementedError


class HookPerturbation(Perturbation):
    """Damage done to what a layer computes, through forward hooks; weights are left untouched."""

    kind: ClassVar[PerturbationKind | None] = HOOKS

    def hooks(self, layer: Layer, level: float, generator: torch.Generator) -> list[RemovableHandle]:
        """Install the hooks that damage ``layer``'s computation at ``level``; return their handles.

        The harness removes them after the cell. Randomness comes from ``generator``, drawn at
        every forward call (so a cell depends on the order of its batches, which is fixed).
        """
        raise NotImplementedError


def contract_problem(obj: object) -> str:
    """What keeps ``obj`` from being a perturbation the harness can run, beyond the fields of
    :class:`Perturbation` (:mod:`lesionbench.contracts` checks those), in one phrase ("" if nothing)."""
    try:
        kind = perturbation_kind(getattr(obj, "kind", None))
    except LesionbenchError:
        return "it must be a lesionbench.WeightPerturbation or lesionbench.HookPerturbation (field 'kind' is missing)"
    if not callable(getattr(obj, kind.method, None)):
        return f"a {kind} perturbation needs a method {kind.method!r}"
    (low, high), levels = obj.level_range, obj.default_levels  # their types are checked by then
    if low > high:
        return f"field 'level_range' must be a pair (low, high) with low <= high, got {tuple(obj.level_range)!r}"
    outside = [x for x in levels if not low <= x <= high]
    if outside:
        return f"default level {outside[0]} is outside its level_range {tuple(obj.level_range)}"
    return ""


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
_BY_BITS = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
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

    Yields whether the damage is done by hooks (then it is not in the tensors alone). ``also``
    names further modules whose tensors the block may change (BatchNorm layers whose statistics
    are re-estimated); they are restored too. Hooks are removed first. ``saved``, a
    :class:`Snapshot` of the clean layer taken earlier, saves copying it again.
    """
    if saved is None or not saved.covers(layer, also):
        saved = Snapshot(layer, also)
    handles: list[RemovableHandle] = []
    kind = perturbation_kind(perturbation.kind)
    functional = kind.hooked and layer.applied_by in HOOKED_OPS
    routed = attention_out_projections(layer) if kind.hooked else []
    try:
        with torch.no_grad():
            handles = kind.start(perturbation, layer, level, generator)
        with HooksAtFunctionalUse(layer.module) if functional else nullcontext(), \
                OutProjectionCalled(routed) if routed else nullcontext():  # fmt: skip
            yield kind.hooked
    finally:
        for handle in handles:
            handle.remove()
        saved.restore()


# Ops whose output has the layout of the module's own output (units on the last axis for linear, on
# axis 1 for a conv): a forward hook means the same thing when run on them.
HOOKED_OPS = {"linear", "conv1d", "conv2d", "conv3d"}
# Ops that apply a layer's weight inside a larger computation, where the harness calls the layer's
# module on that op's input instead (:class:`OutProjectionCalled`): hooks and pre-hooks then run.
ROUTED_OPS = {"multi_head_attention_forward"}
_MHA_SIGNATURE = inspect.signature(nn.functional.multi_head_attention_forward)


def attention_out_projections(layer: Layer) -> list[nn.Module]:
    """The ``out_proj`` of every ``nn.MultiheadAttention`` in the layer (an attention module whose
    heads are knocked out, a block) and the layer's own module when ``multi_head_attention_forward``
    applies it: the modules :class:`OutProjectionCalled` must call for their hooks to run."""
    found = [m.out_proj for m in layer.module.modules() if isinstance(m, nn.MultiheadAttention)]
    return found + ([layer.module] if layer.applied_by in ROUTED_OPS and layer.module not in found else [])


class OutProjectionCalled(TorchFunctionMode):
    """Apply the output projection of ``F.multi_head_attention_forward`` (how ``nn.MultiheadAttention``
    computes; it reads ``out_proj.weight`` and ``out_proj.bias`` as tensors and never calls
    ``out_proj``) through the projection module's own call, for the modules ``out_projections``.

    The attention is computed with an identity output projection (no bias), which gives the
    concatenated head outputs [L, N, E] exactly (x·I = x), and ``out_proj`` is then called on them
    batch first ([N, L, E], as a ``batch_first`` layer would see them; an unbatched [L, E] as one
    item): its forward pre-hooks (head knockout) and forward hooks (activation perturbations) run
    on the projection's real input and output, per image. The attention weights are returned
    unchanged. Same function as PyTorch's up to the rounding of one matrix product."""

    def __init__(self, out_projections: Sequence[nn.Module]) -> None:
        super().__init__()
        self.out = {id(m.weight): m for m in out_projections}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in ROUTED_OPS:
            return func(*args, **kwargs)
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        weight = bound.arguments.get("out_proj_weight")
        module = self.out.get(id(weight))
        if module is None:
            return func(*args, **kwargs)
        bound.arguments["out_proj_weight"] = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        bound.arguments["out_proj_bias"] = None
        heads, attention = func(*bound.args, **bound.kwargs)
        batched = heads.dim() == 3
        out = module(heads.transpose(0, 1) if batched else heads.unsqueeze(0))
        return (out.transpose(0, 1) if batched else out.squeeze(0)), attention


class HooksAtFunctionalUse(TorchFunctionMode):
    """Run ``module``'s forward hooks on the output of every ``linear``/``convNd`` op that applies its
    weight, for a layer applied without its module being called (``layer.forward(x)``,
    ``F.linear(x, layer.weight, layer.bias)``): hook perturbations then damage what it computes."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        if getattr(func, "__name__", "") in HOOKED_OPS and weight is self.module.weight:
            for hook in list(self.module._forward_hooks.values()):
                result = hook(self.module, (args[0] if args else kwargs.get("input"),), out)
                out = out if result is None else result
        return out


def nonfinite_count(layer: Layer) -> int:
    """How many entries of the layer's tensors are NaN or ±Inf (bit flips into the exponent…)."""
    return sum(
        _nonfinite(t)
        for m in layer.modules()
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if t.is_floating_point()
    )


@contextmanager
def nonfinite_outputs(layer: Layer) -> Iterator[list[int]]:
    """Count the NaN/±Inf values ``layer`` emits while the block runs: yields a one-item list.

    Its forward hook is registered after any a hook perturbation installed, so it sees the damaged
    output (activation bit flips into an exponent…); removed on exit.
    """
    count = [0]

    def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            count[0] += _nonfinite(output)

    handle = layer.output_module.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


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
