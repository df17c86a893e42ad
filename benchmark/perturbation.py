"""What a perturbation is, how it is applied in place and undone, and how each cell is seeded.

A perturbation changes one layer's tensors in place; :func:`perturbed` snapshots only the tensors
of the modules it may touch (the layer and the BatchNorm it feeds), so a study never deep-copies
a model, and puts them back bit for bit however the block exits.

The damage primitives (counts, random masks, zeroing by mask) are in :mod:`lesionbench.draws`, the
hooks that reach a layer applied without calling its module in :mod:`lesionbench.hook_routing`; both
stay importable from here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# The damage primitives and the hook routing live in their own modules; their names stay importable
# from here, where plugins have always imported them (to change PERMUTE_BELOW or ZERO_CHUNK, set
# them on lesionbench.draws).
from lesionbench.draws import PERMUTE_BELOW as PERMUTE_BELOW
from lesionbench.draws import ZERO_CHUNK as ZERO_CHUNK
from lesionbench.draws import binomial_count as binomial_count
from lesionbench.draws import count_for as count_for
from lesionbench.draws import distinct_positions as distinct_positions
from lesionbench.draws import positions_mask as positions_mask
from lesionbench.draws import random_subset_mask as random_subset_mask
from lesionbench.draws import zero_entries as zero_entries
from lesionbench.errors import LesionbenchError
from lesionbench.hook_routing import HOOKED_OPS, HooksAtFunctionalUse, OutProjectionCalled, attention_out_projections
from lesionbench.hook_routing import ROUTED_OPS as ROUTED_OPS
from lesionbench.kinds import (
    DESCENDING,
    HOOKS,
    LINEAR,
    LOG,
    WEIGHTS,
    AxisScale,
    PerturbationKind,
    axis_scale,
    perturbation_kind,
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
        example through the model and removes them (:func:`lesionbench.applicability.check_by_forward`).
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
        with (
            HooksAtFunctionalUse(layer.module) if functional else nullcontext(),
            OutProjectionCalled(routed) if routed else nullcontext(),
        ):
            yield kind.hooked
    finally:
        for handle in handles:
            handle.remove()
        saved.restore()


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
