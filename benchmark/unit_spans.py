"""Unit following: where a layer's output units lie in the values computed from them.

A layer's units are its output channels (conv) or features (Linear). Followed through elementwise
activations, pooling, concatenations, slices and splits, reshapes and flattens, permutes and
reductions, they show which per-channel affine norm each unit feeds, so that silencing a unit can
be applied after that norm. :func:`follow_units` is the rule for one op; :class:`UnitSpan` is where
the units lie in one value. The forward-pass probe (:mod:`lesionbench.probe`) applies it at every
torch function call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lesionbench.layers import kind_of, unit_axis_of

# Ops that map each value to one value in place of it (channel for channel): a unit silenced before
# one of them is still the same unit after it, so a BatchNorm behind them is the one the unit feeds.
ELEMENTWISE = {
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "hardtanh_",
    "leaky_relu",
    "leaky_relu_",
    "gelu",
    "silu",
    "silu_",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "elu",
    "elu_",
    "selu",
    "celu",
    "mish",
    "softplus",
    "dropout",
    "dropout_",
    "alpha_dropout",
    "feature_alpha_dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "contiguous",
    "clone",
    "detach",
    "float",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "abs",
    "neg",
    # fake quantization of activations (QAT's FakeQuantize modules): zero is always representable, so 0 stays 0
    "fake_quantize_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "fused_moving_avg_obs_fake_quant",
}


# Ops that keep the channels of an [N, C, ...] value (a silent channel stays silent) and those that
# only reshape a value, for following a layer's units to the BatchNorm they feed.
CHANNEL_PRESERVING = {
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "interpolate",
    "pad",
}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
PERMUTES = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t"}
REDUCTIONS = {"mean", "sum", "amax", "amin", "nanmean", "nansum"}  # over some axes: zeros give zero
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def func_of(name: str, value: torch.Tensor):
    """The tensor method ``name`` as a function (``torch.Tensor.transpose``), or None."""
    return getattr(torch.Tensor, name, None) if callable(getattr(torch.Tensor, name, None)) else None


# The functional norms whose per-channel affine a silenced unit must pass through as zero, and where
# their channels lie: axis 1 of [N, C, ...] (batch, group, instance norm), or the first normalized
# axis (layer_norm / rms_norm over ``normalized_shape``, given as their second argument).
NORM_FUNCTIONS = {"batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"}


def norm_channel_axis(name: str, args: tuple, kwargs: dict, value: torch.Tensor) -> int:
    """The axis (counted from the end) of ``value`` that a functional norm ``name`` treats as channels."""
    if name in ("layer_norm", "rms_norm"):
        shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else ())
        return -len(shape) if isinstance(shape, (tuple, list, torch.Size)) else -1
    return 1 - value.dim()


SPLITS = {"split", "split_with_sizes", "chunk", "tensor_split", "narrow"}


@dataclass(frozen=True)
class UnitSpan:
    """Where a layer's output units lie in a value: unit u, for ``lo <= u < hi``, is position
    ``u + shift`` along ``axis`` (counted from the end). A concatenation shifts the units, a slice
    keeps only some of them."""

    layer: nn.Module
    axis: int
    shift: int
    lo: int
    hi: int
    width: int = 1  # after a flatten: unit u fills positions u·width + shift … u·width + shift + width − 1

    def moved(self, start: int, stop: int) -> UnitSpan | None:
        """The span in the slice ``[start, stop)`` of its axis (positions renumbered from ``start``);
        after a flatten, only the units the slice keeps whole."""
        w = self.width
        lo, hi = max(self.lo, -((self.shift - start) // w)), min(self.hi, (stop - self.shift) // w)
        return UnitSpan(self.layer, self.axis, self.shift - start, lo, hi, w) if lo < hi else None


def _layer_span(layer: nn.Module, value: torch.Tensor) -> UnitSpan:
    """A layer's own output: units along the last axis (Linear) or the channel axis (conv)."""
    axis = -1 if kind_of(layer) == "linear" else 1 - value.dim()
    return UnitSpan(layer, axis, 0, 0, int(layer.weight.shape[unit_axis_of(layer)]))


def _dim_of(args: tuple, kwargs: dict, position: int, default: int = 0) -> int:
    dim = kwargs.get("dim", args[position] if len(args) > position else default)
    return int(dim)


def _slices(index: Any, ndim: int) -> list[slice] | None:
    """A basic index as one slice per axis, or None when it is not made of slices (and ``...``)."""
    index = index if isinstance(index, tuple) else (index,)
    if sum(ix is Ellipsis for ix in index) > 1 or not all(isinstance(ix, slice) or ix is Ellipsis for ix in index):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1 :]
    return list(index) + [slice(None)] * (ndim - len(index))


def _sliced(spans: tuple[UnitSpan, ...], source: torch.Tensor, cuts: list[slice]) -> tuple[UnitSpan, ...]:
    out = []
    for span in spans:
        cut = cuts[source.dim() + span.axis]
        if cut.step not in (None, 1):
            continue
        start, stop, _ = cut.indices(source.shape[span.axis])
        moved = span.moved(start, stop)
        if moved is not None:
            out.append(moved)
    return tuple(out)


def follow_units(
    name: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor], units: dict[int, tuple[UnitSpan, ...]]
) -> list[tuple[UnitSpan, ...]]:
    """Where the layers' units in an op's inputs lie in each of its outputs (empty: nowhere known)."""
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    none: list[tuple[UnitSpan, ...]] = [()] * len(outputs)
    if name in ("cat", "concat", "concatenate") and args and isinstance(args[0], (list, tuple)) and outputs:
        parts, out, offset = args[0], [], 0
        dim = _dim_of(args, kwargs, 1)
        for part in parts:
            if isinstance(part, torch.Tensor) and not (part.dim() == 1 and part.numel() == 0):  # (0,): no units
                axis = dim - part.dim() if dim >= 0 else dim
                for span in units.get(id(part), ()):
                    out.append(replace(span, shift=span.shift + offset * (span.axis == axis)))
                offset += part.shape[dim]
        return [tuple(out)] + none[1:]
    if first is None or id(first) not in units or not outputs:
        return none
    spans, t = units[id(first)], outputs[0]
    if name in ELEMENTWISE and t.shape == first.shape:
        return [spans] + none[1:]
    if name in CHANNEL_PRESERVING and t.dim() == first.dim() and t.shape[:2] == first.shape[:2]:
        return [tuple(s for s in spans if s.axis == 1 - first.dim())] + none[1:]
    if name in RESHAPES:  # the units' axis and all after it kept (LeViT's flatten(0, 1)), or all before it
        kept = []
        for s in spans:
            at = first.dim() + s.axis
            if -s.axis <= t.dim() and t.shape[s.axis :] == first.shape[s.axis :]:
                kept.append(s)
            elif at < t.dim() and t.shape[: at + 1] == first.shape[: at + 1]:
                kept.append(replace(s, axis=at - t.dim()))
            else:  # the units' axis merged with the k − 1 after it (a flatten): each unit fills a block
                for k in range(2, first.dim() - at + 1):
                    inner = math.prod(first.shape[at + 1 : at + k])
                    if (
                        t.shape[:at] == first.shape[:at]
                        and at < t.dim()
                        and t.shape[at] == first.shape[at] * inner
                        and t.shape[at + 1 :] == first.shape[at + k :]
                    ):
                        kept.append(replace(s, axis=at - t.dim(), shift=s.shift * inner, width=s.width * inner))
                        break
        return [tuple(kept)] + none[1:]
    if name in REDUCTIONS and t.is_floating_point():  # a mean over positions: a silent channel stays silent
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dims is None or isinstance(dims, torch.Tensor):
            return none
        dims = {d % first.dim() for d in ((dims,) if isinstance(dims, int) else dims)}
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        out = []
        for s in spans:
            at = first.dim() + s.axis
            if at not in dims:
                out.append(replace(s, axis=(at if keep else at - sum(d < at for d in dims)) - t.dim()))
        return [tuple(out)] + none[1:]
    if name in PERMUTES:  # the units' axis moves: where to, from the op applied to a shape of distinct sizes
        probe, sizes = func_of(name, first), torch.Size(_PRIMES[: first.dim()])
        try:
            moved = probe(torch.empty(sizes, device="meta"), *args[1:], **kwargs).shape if probe else ()
        except (RuntimeError, TypeError, IndexError, ValueError):  # arguments only the real call understands
            moved = ()
        if moved:
            if sorted(moved) == sorted(sizes) and t.dim() == first.dim():
                return [tuple(replace(s, axis=moved.index(sizes[s.axis]) - t.dim()) for s in spans)] + none[1:]
        return none
    if name == "__getitem__" and len(args) > 1:
        cuts = _slices(args[1], first.dim())
        return none if cuts is None else [_sliced(spans, first, cuts)] + none[1:]
    if name in SPLITS:
        dim = _dim_of(args, kwargs, 1) if name == "narrow" else _dim_of(args, kwargs, 2)
        start, found = 0, []
        for piece in outputs:
            cuts = [slice(None)] * first.dim()
            if name == "narrow":
                start = int(args[2]) % first.shape[dim]
            cuts[dim] = slice(start, start + piece.shape[dim])
            found.append(_sliced(spans, first, cuts))
            start += piece.shape[dim]
        return found
    return none
