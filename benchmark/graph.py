"""The model graph: one analysis of a network that every later step asks its questions of.

Two views of the same network, each built once per model:

* a **probe**, one forward pass of a one-image input under a :class:`TorchFunctionMode` that sees
  every torch function the network calls, with which tensors. It answers which Conv/Linear layers
  the forward pass uses and in what order (by the first read of their weight, so a layer used
  through a functional call — ``nn.MultiheadAttention.out_proj`` — counts, and declaration order
  does not), which per-channel affine norm (BatchNorm, GroupNorm, InstanceNorm, LayerNorm/RMSNorm
  over channels) each layer's output units feed (through elementwise activations, in place or
  not, pooling, concatenations, slices, transposes/permutes and flattens, at every use of a module
  called more than once; a weight transformed before it is applied — standardised, fake-quantized —
  is still the layer's), which layers are applied outside their module's call, which BatchNorms
  lie downstream of a layer on any branch (what a damage can reach), which other weights the pass
  reads, and the model's output;
* a **torch.fx trace** (timm's own lists of modules and functions to keep whole), in which every
  in-place op that writes into a tensor read later is made an explicit dependency, so that the
  fast engine can cut the network at a layer (:func:`split_at`) and step from one cut to the next
  (:func:`transition`) without losing a data dependency.

Weights are compared by storage, not by object: a Parameter that views another's memory is the
same weight (a tie).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lesionbench.errors import LesionbenchError
from lesionbench.evaluate import logits_of
from lesionbench.layers import AFFINE_NORMS, NORMS, Layer, is_layer, kind_of, layer_types, unit_axis_of
from lesionbench.state import frozen_observers

log = logging.getLogger("lesionbench")

# Ops that map each value to one value in place of it (channel for channel): a unit silenced before
# one of them is still the same unit after it, so a BatchNorm behind them is the one the unit feeds.
ELEMENTWISE = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "gelu", "silu", "silu_",
    "hardswish", "hardswish_", "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu", "elu_", "selu",
    "celu", "mish", "softplus", "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout", "dropout1d",
    "dropout2d", "dropout3d", "clamp", "clamp_", "clip", "clip_", "contiguous", "clone", "detach", "float", "half",
    "bfloat16", "to", "type_as", "abs", "neg",
    # fake quantization of activations (QAT's FakeQuantize modules): zero is always representable, so 0 stays 0
    "fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine", "fused_moving_avg_obs_fake_quant",
}  # fmt: skip


def storages(tensors: Sequence[torch.Tensor]) -> set[int]:
    """Where the tensors' bytes live: two tensors sharing memory share an entry."""
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def unsupported_weight(module: nn.Module) -> str:
    """Why damage to ``module``'s stored weight would not reach its forward pass ("" if it would)."""
    if "weight_orig" in module._parameters and "weight_mask" in module._buffers:
        return ("its weight is recomputed as weight_orig × weight_mask by torch.nn.utils.prune at every call "
                "(make the pruning permanent with torch.nn.utils.prune.remove(module, 'weight') to study it)")  # fmt: skip
    if parametrize.is_parametrized(module, "weight"):
        return "its weight is computed by a parametrization (weight_norm, spectral_norm, …) at every call"
    if "weight" not in module._parameters:
        return "its weight is not a stored Parameter (recomputed by a hook, e.g. the old weight_norm)"
    return ""


# Ops that keep the channels of an [N, C, ...] value (a silent channel stays silent) and those that
# only reshape a value, for following a layer's units to the BatchNorm they feed.
CHANNEL_PRESERVING = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "interpolate", "pad",
}  # fmt: skip
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


def follow_units(name: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor],
                 units: dict[int, tuple[UnitSpan, ...]]) -> list[tuple[UnitSpan, ...]]:  # fmt: skip
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
                    if (t.shape[:at] == first.shape[:at] and at < t.dim() and t.shape[at] == first.shape[at] * inner
                            and t.shape[at + 1 :] == first.shape[at + k :]):  # fmt: skip
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


@dataclass
class Probe:
    """What one instrumented forward pass saw."""

    order: list[nn.Module]  # perturbable modules by first read of their weight
    feeds: dict[nn.Module, list[UnitSpan]]  # layer -> where its units enter BatchNorms (every use)
    downstream_norms: dict[nn.Module, list[nn.Module]]  # layer -> BatchNorms anything it computes reaches
    output: torch.Tensor  # the logits for the probe input
    functional: dict[nn.Module, str] = field(default_factory=dict)  # layer -> op applying it outside its call
    other_weights: dict[str, str] = field(default_factory=dict)  # weight read that is no layer's -> the op


class _Watch(TorchFunctionMode):
    """Follows tensors through one forward pass: which layers each value depends on, and which
    values are a layer's output units up to elementwise ops."""

    def __init__(self, layer_of: dict[int, nn.Module], norm_of: dict[int, nn.Module]) -> None:
        super().__init__()
        self.layer_of, self.norm_of = layer_of, norm_of
        self.order: list[nn.Module] = []
        self.feeds: dict[nn.Module, list[tuple[nn.Module, UnitSpan]]] = {}
        self.downstream: dict[nn.Module, list[nn.Module]] = {}
        self.taint: dict[int, frozenset] = {}  # id(tensor) -> layers it depends on
        self.units: dict[int, tuple[UnitSpan, ...]] = {}  # id(tensor) -> where layers' output units lie in it
        self._keep: list[torch.Tensor] = []  # ids stay unique while the pass runs
        self.data: set[int] = set()  # ids of values computed from the input (not from weights alone)
        self.derived: dict[int, tuple[nn.Module, ...]] = {}  # id -> layers whose weight it is, transformed
        self.calling: list[nn.Module] = []  # modules whose __call__ is running
        self.wrapped: dict[nn.Module, nn.Module] = {}  # LoRA wrapper -> its base layer
        self.functional: dict[nn.Module, str] = {}  # layer -> op that applied its weight outside its call
        self.weight_names: dict[int, str] = {}  # id -> name of a weight (≥ 2-d) that is no layer's or norm's
        self.other_weights: dict[str, str] = {}  # such a weight, read -> the first op reading it

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def pre(module, _args):
            self.calling.append(module)

        def post(module, _args, out):
            if self.calling and self.calling[-1] is module:
                self.calling.pop()
            base = self.wrapped.get(module)
            if base is not None and isinstance(out, torch.Tensor):  # a LoRA wrapper's output: its base's units
                self._keep.append(out)
                self.units[id(out)] = (_layer_span(base, out),)

        self._hooks = [register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._hooks:
            handle.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        for t in inputs:
            if id(t) in self.weight_names and name not in ("__get__", "size", "dim", "numel"):
                self.other_weights.setdefault(self.weight_names[id(t)], name)
        read = [self.layer_of[id(t)] for t in inputs if id(t) in self.layer_of]
        read += [layer for t in inputs for layer in self.derived.get(id(t), ()) if layer not in read]
        for layer in read:
            if layer not in self.order:
                self.order.append(layer)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if read and not any(id(t) in self.data for t in inputs):  # a weight transformed (standardised,
            for t in outputs:  # fake-quantized…) before the op that applies it: still the layers' weight
                self._keep.append(t)
                self.derived[id(t)] = tuple(read)
            return out
        for layer in read:
            if not any(layer is m for m in self.calling):
                self.functional.setdefault(layer, name)  # its output never passes through its own call
        taint = frozenset().union(*(self.taint.get(id(t), frozenset()) for t in inputs), read)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in NORM_FUNCTIONS and first is not None:
            norm = next((self.norm_of[id(t)] for t in inputs if id(t) in self.norm_of), None)
            if norm is not None:
                axis = norm_channel_axis(name, args, kwargs, first)
                for span in self.units.get(id(first), ()):
                    fed = self.feeds.setdefault(span.layer, [])
                    if span.axis == axis and (norm, span) not in fed:  # units on the norm's channels
                        fed.append((norm, span))
                for layer in self.taint.get(id(first), ()) if isinstance(norm, NORMS) else ():
                    if norm not in self.downstream.setdefault(layer, []):
                        self.downstream[layer].append(norm)
        if any(id(t) in self.data for t in inputs):
            self.data.update(id(t) for t in outputs)
        inplace = name.endswith("_") and not name.endswith("__") or kwargs.get("inplace") is True
        if inplace and first is not None:
            outputs.append(first)  # written in place: what it holds now depends on the op's inputs
        if read and outputs:  # a layer's output (the first value of what reads its weight, e.g. attention's)
            spans = [tuple(_layer_span(layer, outputs[0]) for layer in read)] + [()] * (len(outputs) - 1)
        else:
            spans = follow_units(name, args, kwargs, outputs, self.units)
        if inplace and first is not None and not read:
            spans[-1] = spans[0] if name in ELEMENTWISE else ()  # what was written into holds the result
        for t, where in zip(outputs, spans):
            self._keep.append(t)
            self.taint[id(t)] = taint
            if where:
                self.units[id(t)] = where
            else:
                self.units.pop(id(t), None)
        return out


def probe(module: nn.Module, example: torch.Tensor) -> Probe:
    """Run ``example`` through ``module`` once, watching every torch function call (see module doc)."""
    layer_of, norm_of = {}, {}
    for m in module.modules():
        if is_layer(m) and not unsupported_weight(m):
            for t in (m.weight, m.bias):
                if t is not None:
                    layer_of[id(t)] = m
        elif isinstance(m, AFFINE_NORMS):
            for t in module_tensors(m):
                norm_of[id(t)] = m
    watch = _Watch(layer_of, norm_of)
    watch.data.add(id(example))
    wrappers = lora_wrappers(module)
    watch.wrapped = {wrapper: base for base, (wrapper, _adapters) in wrappers.items()}
    adapters = {id(t) for _w, adapters in wrappers.values() for a, b, _s in adapters for t in (a.weight, b.weight)}
    watch.weight_names = {
        id(t): name for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.is_floating_point() and t.dim() >= 2 and id(t) not in layer_of and id(t) not in norm_of and id(t) not in adapters
    }  # fmt: skip
    output = run_once(module, example, watch)
    return Probe(watch.order, watch.feeds, watch.downstream, output, watch.functional, watch.other_weights)


def run_once(module: nn.Module, example: torch.Tensor, mode: TorchFunctionMode | None = None) -> torch.Tensor:
    """The class scores of one forward pass in eval mode (under ``mode``), leaving the model as it was:
    training flags put back, quantization observers off (:func:`lesionbench.state.frozen_observers`)."""
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad(), frozen_observers(module), mode if mode is not None else nullcontext():
            return logits_of(module(example)).detach()
    finally:
        for m, training in modes.items():
            m.training = training


def lora_wrappers(module: nn.Module) -> dict[nn.Module, tuple[nn.Module, tuple[tuple[nn.Module, nn.Module, float], ...]]]:
    """LoRA-wrapped layers in peft's layout: base layer -> (wrapper, ((A, B, scaling) per adapter)).

    A wrapper has ``base_layer`` (a Linear or Conv1D), ``lora_A`` and ``lora_B`` (ModuleDicts keyed
    by adapter name, or single modules) holding Linear layers, and ``scaling`` (a number or a dict
    by adapter name), and computes base(x) + Σ scaling·B(A(x)) (huggingface/peft ``LoraLayer``;
    dropout is the identity in eval mode). Adapters of another shape (conv LoRA, DoRA) are not
    grouped: their layers stay layers of their own.
    """
    found = {}
    for wrapper in module.modules():
        base, lora_a, lora_b = (getattr(wrapper, k, None) for k in ("base_layer", "lora_A", "lora_B"))
        if not (isinstance(base, nn.Module) and is_layer(base)) or lora_a is None:
            continue
        if len(getattr(wrapper, "lora_magnitude_vector", None) or ()):  # DoRA: not base + s·B·A
            continue
        a_of = dict(lora_a.items()) if isinstance(lora_a, nn.ModuleDict) else {"": lora_a}
        b_of = dict(lora_b.items()) if isinstance(lora_b, nn.ModuleDict) else {"": lora_b}
        scaling = getattr(wrapper, "scaling", 1.0)
        adapters = []
        for key, a in a_of.items():
            b, scale = b_of.get(key), scaling.get(key) if isinstance(scaling, dict) else scaling
            if _adapter_pair(base, a, b) and isinstance(scale, (int, float)):
                adapters.append((a, b, float(scale)))
        if adapters and len(adapters) == len(a_of):
            found[base] = (wrapper, tuple(adapters))
    return found


def packed_weight(module: nn.Module) -> str:
    """Why a module whose weight is packed for a quantized kernel is not a layer ("" if it is not one)."""
    if is_layer(module) or not type(module).__module__.startswith("torch.ao.nn.quantized"):
        return ""
    if type(module).__name__.endswith("PackedParams"):  # the holder inside a quantized module, named with it
        return ""
    if not (callable(getattr(module, "weight", None)) or hasattr(module, "_all_weight_values")):
        return ""
    return (f"a quantized {type(module).__module__}.{type(module).__name__}: its int8 weight is packed for the "
            "kernel, not a stored tensor a perturbation can change (study the float model, or int8:<model>, "
            "whose int8 layers lesionbench can damage)")  # fmt: skip


def _adapter_pair(base: nn.Module, a: nn.Module, b: nn.Module) -> bool:
    """Whether B(A(x)) is a linear map with the base's layout, weight B·A (bias-free Linear pairs; for a
    conv base, A a conv like the base's (kernel, stride, padding, dilation, one group) and B a 1×1 conv)."""
    if not all(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.bias is None for m in (a, b)):
        return False
    if kind_of(base) == "linear":
        return isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
    same = ("kernel_size", "stride", "padding", "dilation")
    return (type(a) is type(b) and isinstance(base, type(a)) and a.groups == b.groups == base.groups == 1
            and all(getattr(a, k) == getattr(base, k) for k in same) and set(b.kernel_size) == {1}
            and set(b.stride) == {1} and isinstance(b.padding, tuple) and set(b.padding) == {0})  # fmt: skip


def check_module(module: nn.Module, name: str) -> None:
    """Refuse, in one line, a model whose layers lesionbench cannot see (a TorchScript module)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise LesionbenchError(
            f"model {name!r} is a TorchScript module (torch.jit.script / torch.jit.trace), which lesionbench does not "
            "support: its compiled forward pass makes no Python torch calls to watch and cannot be traced by torch.fx, "
            "so the layers it reads, their order and what they feed cannot be found; give the nn.Module it was "
            "scripted from"
        )


# ------------------------------------------------------------------------------------ fx


def _timm_trace_helpers() -> tuple[tuple[type, ...], tuple]:
    """timm's public lists of modules to keep whole and functions to leave untraced (TF "SAME" padding…)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        try:  # timm releases before the lists were exported from timm.layers
            from timm.models import get_notrace_functions, get_notrace_modules
        except ImportError:  # timm absent: plain tracing only
            return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class _Tracer(fx.Tracer):
    """Keeps every perturbable layer (and timm's untraceable modules) as one call_module node."""

    def __init__(self) -> None:
        leaves, functions = _timm_trace_helpers()
        super().__init__(autowrap_functions=functions)
        self._leaves = layer_types() + leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior,
                      operator.ixor, operator.ipow, operator.ifloordiv, operator.imod, operator.ilshift,
                      operator.irshift, operator.imatmul}  # fmt: skip
_VIEW_METHODS = {"view", "view_as", "reshape", "transpose", "permute", "t", "expand", "expand_as", "narrow", "select",
                 "squeeze", "unsqueeze", "flatten", "unflatten", "chunk", "split", "unbind", "as_strided",
                 "diagonal", "movedim", "swapaxes", "__getitem__", "unfold", "detach"}  # fmt: skip
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.transpose, torch.permute, torch.reshape, torch.squeeze,
                   torch.unsqueeze, torch.chunk, torch.split, torch.narrow, torch.select, torch.unbind,
                   torch.movedim}  # fmt: skip


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may write into one of its inputs (``x.add_()``, ``inplace=True``, ``+=``, ``out=``)."""
    if node.kwargs.get("inplace") or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    return False


def _written(node: fx.Node) -> fx.Node | None:
    """The graph value an in-place node writes into."""
    target = node.kwargs.get("out", node.args[0] if node.args else None)
    return target if isinstance(target, fx.Node) else None


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def make_inplace_explicit(gm: fx.GraphModule, example: torch.Tensor) -> str:
    """Rewire the graph so that everything reading a tensor after an in-place write reads the write.

    ``x.add_(f(x))`` as a statement leaves later nodes reading ``x``'s producer, so the graph would
    say they do not depend on ``f``; an in-place op returns the tensor it wrote, so pointing later
    readers at it changes no value and restores the dependency. Which nodes hold tensors comes from
    a shape-propagation pass (:class:`torch.fx.passes.shape_prop.ShapeProp`). Returns why the graph
    cannot be made safe ("" when it can): a write into a *view* changes its base too, which no
    rewiring of the view's readers covers.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        ShapeProp(gm).propagate(example)
    except Exception as exc:  # noqa: BLE001 - reported as the reason for full passes
        return f"shape propagation failed ({type(exc).__name__})"
    latest: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        for old, new in list(latest.items()):
            if old in node.all_input_nodes and node is not new:
                node.replace_input_with(old, new)
        if not is_inplace(gm, node):
            continue
        target = _written(node)
        if target is None or "tensor_meta" not in target.meta:
            continue
        if _is_view(target):
            return f"node {node.name!r} writes in place into a view ({target.name})"
        root = next((old for old, new in latest.items() if new is target), target)
        latest[root] = node
        latest[target] = node
    gm.graph.lint()
    gm.recompile()
    return ""


def trace(module: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule | None, str]:
    """An fx graph of ``module`` sharing its parameters, with in-place writes made explicit; or
    None and the reason when the model cannot be traced safely."""
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # data-dependent control flow, unsupported ops, ...
        return None, f"torch.fx cannot trace it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    gm = fx.GraphModule(module, graph)
    why = make_inplace_explicit(gm, example)
    return (None, why) if why else (gm, "")


def _touches(gm: fx.GraphModule, node: fx.Node, shared: set[int]) -> bool:
    """Whether ``node`` reads a tensor whose memory is one of ``shared``."""
    if node.op == "call_module":
        return bool(storages(module_tensors(gm.get_submodule(node.target))) & shared)
    if node.op == "get_attr":
        obj: Any = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return isinstance(obj, torch.Tensor) and bool(storages([obj]) & shared)
    return False


@dataclass
class Split:
    """A model cut at one layer: ``suffix(*prefix(x)) == model(x)``."""

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    boundary: tuple[str, ...]  # names of the graph nodes whose values cross the cut, in argument order
    mutates_boundary: bool  # the suffix writes into a boundary value: feed it copies

    @property
    def n_boundary(self) -> int:
        return len(self.boundary)


def split_at(gm: fx.GraphModule, layer_name: str, tensors: Sequence[torch.Tensor] = ()) -> Split | None:
    """The prefix/suffix split at a layer, or None when the cut would be wrong or impossible.

    The prefix maps the model's input to the boundary values; the suffix maps the boundary values
    to the model's output. A layer inside a module kept whole is split at that module; a layer
    whose weight is read by a functional call starts at the nodes reading it. ``tensors`` are the
    parameters and buffers a perturbation of the layer may change: if anything upstream also reads
    their memory (tied weights, a reused module), no cut can cache it and None is returned.

    Why not ``torch.fx.passes.split_module``: given "downstream of the layer" as the partition it
    builds the same prefix and suffix, in about the same time (54 cuts of timm's ResNet-50: 8.4 s
    against 7.9 s here, one measurement on a loaded 2-core machine), but it cannot build the
    segment between two cuts (:func:`transition`), which is what lets the engine fill every
    layer's cache in one forward pass; copying nodes ourselves keeps both in one place.
    """
    graph = gm.graph
    prefix_of = f"{layer_name}."
    starts = set()
    for n in graph.nodes:
        if n.op == "call_module" and (n.target == layer_name or layer_name.startswith(f"{n.target}.")):
            starts.add(n)
        elif n.op == "get_attr" and n.target.startswith(prefix_of):
            starts.update(n.users)
    if not starts:
        return None
    downstream: set[fx.Node] = set()
    for node in graph.nodes:  # topological order: a node is downstream if any input is
        if node in starts or any(a in downstream for a in node.all_input_nodes):
            downstream.add(node)
    shared = storages(tensors)
    if any(_touches(gm, n, shared) for n in graph.nodes if n not in downstream and n.op != "get_attr"):
        return None
    if any(_touches(gm, n, shared) and not (set(n.users) <= downstream) for n in graph.nodes if n.op == "get_attr"):
        return None
    output = next(n for n in graph.nodes if n.op == "output")
    consumers = [n for n in graph.nodes if n in downstream or n is output]
    boundary: list[fx.Node] = []
    for node in consumers:
        for a in node.all_input_nodes:
            if a not in downstream and a.op != "get_attr" and a not in boundary:
                boundary.append(a)

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in downstream or node.op == "output":
            continue
        env[node] = prefix_graph.node_copy(node, lambda a: env[a])
    prefix_graph.output(tuple(env[b] for b in boundary))

    suffix_graph = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {b: suffix_graph.placeholder(f"boundary_{i}") for i, b in enumerate(boundary)}
    for node in graph.nodes:
        if node.op == "get_attr":
            senv[node] = suffix_graph.node_copy(node, lambda a: senv[a])
        elif node in downstream or node.op == "output":
            senv[node] = suffix_graph.node_copy(node, lambda a: senv[a])
    suffix = _part(gm, suffix_graph)
    return Split(_part(gm, prefix_graph), suffix, tuple(b.name for b in boundary), _writes_into_inputs(suffix))


def _part(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A part of ``gm``'s graph as a module sharing its parameters, dead code removed."""
    part = fx.GraphModule(gm, graph)
    part.graph.eliminate_dead_code()
    part.recompile()
    return part


def _writes_into_inputs(part: fx.GraphModule) -> bool:
    """Whether some op of ``part`` writes in place into one of its inputs (placeholders)."""
    placeholders = {n for n in part.graph.nodes if n.op == "placeholder"}
    return any(is_inplace(part, n) and placeholders & set(n.all_input_nodes) for n in part.graph.nodes)


def transition(gm: fx.GraphModule, start: tuple[str, ...], end: tuple[str, ...]) -> fx.GraphModule | None:
    """A graph computing the boundary values ``end`` from the boundary values ``start``, or None.

    Moving from one layer's cut to the next, the next layer's cached values mostly lie downstream
    of the previous one's: computing them from the previous cache runs only the segment between the
    two cuts instead of the whole prefix again (one forward pass in all for a chain). None when an
    ``end`` value needs the model's input (the next cut is not downstream of this one, or a skip
    connection reaches around it) or when the segment would write into a ``start`` value.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    starts = [nodes[name] for name in start]
    needed: set[fx.Node] = set()
    stack = [nodes[name] for name in end]
    while stack:
        node = stack.pop()
        if node in needed or node in starts:
            continue
        if node.op == "placeholder":
            return None
        needed.add(node)
        stack.extend(node.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(f"boundary_{i}") for i, n in enumerate(starts)}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[nodes[name]] for name in end))
    step = _part(gm, graph)
    return None if _writes_into_inputs(step) else step


# ------------------------------------------------------------------------------------ the graph


@dataclass
class ModelGraph:
    """One model analysed once: its layers in forward order, what they feed, and how to cut it.

    Build with :meth:`of`. ``layers`` are every Conv/Linear (not transposed) or transformers
    ``Conv1D`` module whose stored weight the forward pass reads, in the order of the first read (a
    LoRA-wrapped layer is one layer, its adapters folded in); ``left_out`` says, per module or
    weight path, why something the model holds or reads is not among them (parametrized or pruned
    weights, packed quantized modules, TorchScript submodules, LoRA adapter parts, weights no layer
    owns).
    """

    module: nn.Module
    example: torch.Tensor
    layers: list[Layer]
    output_shape: tuple[int, ...]  # of the class scores for the one-image example
    left_out: dict[str, str] = field(default_factory=dict)
    downstream_norms: dict[str, list[nn.Module]] = field(default_factory=dict)  # layer name -> norms
    _fx: tuple[fx.GraphModule | None, str] | None = None

    @classmethod
    def of(cls, module: nn.Module, example: torch.Tensor, aliases: Mapping[str, str] | None = None) -> ModelGraph:
        """Analyse ``module`` on ``example`` (a one-image batch in the model's dtype and device)."""
        aliases = dict(aliases or {})
        names = {m: n for n, m in module.named_modules(remove_duplicate=False)}
        seen = probe(module, example)
        wrappers = {}  # only adapters the forward pass applies (not a disabled, merged or inactive one)
        for base, (wrapper, adapters) in lora_wrappers(module).items():
            used = tuple((a, b, scale) for a, b, scale in adapters if a in seen.order and b in seen.order)
            if used:
                wrappers[base] = (wrapper, used)
        left_out = {}
        for base, (_wrapper, adapters) in wrappers.items():
            for part in (m for a, b, _s in adapters for m in (a, b)):
                left_out[names[part]] = (f"part of the LoRA adapter of {names[base]}, studied as one layer with it "
                                         "(effective weight base + s·B·A)")  # fmt: skip
        for name, m in module.named_modules():
            if is_layer(m) and m not in seen.order and name not in left_out:
                left_out[name] = unsupported_weight(m) or "the forward pass never reads its weight"
            elif packed_weight(m):
                left_out[name] = packed_weight(m)
            elif isinstance(m, torch.jit.ScriptModule) and not any(name.startswith(f"{k}.") for k in left_out):
                left_out[name] = ("a TorchScript submodule: its compiled code's weight reads cannot be watched, so "
                                  "the layers inside it are not studied (give its nn.Module instead)")  # fmt: skip
        for name, op in seen.other_weights.items():
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            left_out.setdefault(name, f"a weight of {type(owner).__name__} that {op!r} reads, not a Conv/Linear/Conv1D "
                                      "layer's: no perturbation reaches it")  # fmt: skip
        order = [m for m in seen.order if names[m] not in left_out]
        n = len(order)
        layers = []
        for i, m in enumerate(order):
            name = names[m]
            wrapper, adapters = wrappers.get(m, (None, ()))
            fed = seen.feeds.get(m, ())
            norms = tuple(norm for norm, _span in fed)
            layers.append(
                Layer(
                    name=name,
                    display=aliases.get(name, name),
                    index=i,
                    relative_depth=i / (n - 1) if n > 1 else 0.0,
                    kind=kind_of(m),
                    module=m,
                    unit_axis=unit_axis_of(m),
                    norms=norms,
                    norm_names=tuple(names[x] for x in norms),
                    norm_spans=tuple((span.shift, span.lo, span.hi) for _norm, span in fed),
                    norm_widths=tuple(span.width for _norm, span in fed),
                    applied_by=seen.functional.get(m, ""),
                    wrapper=wrapper,
                    adapters=adapters,
                    adapter_names=tuple(names[x] for a, b, _s in adapters for x in (a, b)),
                )
            )
        downstream = {names[m]: list(v) for m, v in seen.downstream_norms.items()}
        return cls(module, example, layers, tuple(seen.output.shape), left_out, downstream)

    @property
    def num_classes(self) -> int:
        """Class count, from the model's output (not from the last layer declared)."""
        if len(self.output_shape) != 2:
            raise LesionbenchError(
                f"the model's class scores have shape {self.output_shape} for one image; lesionbench needs "
                "[images, classes]"
            )
        return self.output_shape[-1]

    @property
    def fx(self) -> fx.GraphModule | None:
        """The traced graph (traced on first use), or None when the model cannot be traced safely."""
        if self._fx is None:
            device = next((p.device for p in self.module.parameters()), self.example.device)
            self._fx = trace(self.module, self.example.to(device))
        return self._fx[0]

    @property
    def untraceable(self) -> str:
        """Why there is no fx graph ("" when there is one)."""
        self.fx  # noqa: B018 - the property traces on first access, filling _fx
        return self._fx[1]

    def norms_reached(self, layer: Layer) -> list[nn.Module]:
        """The BatchNorms whose input depends on ``layer``: what a recalibration must re-estimate."""
        return list(self.downstream_norms.get(layer.name, []))

    def split(self, layer: Layer) -> Split | None:
        """The cut at ``layer`` (None when the fast engine cannot cache upstream of it)."""
        if self.fx is None:
            return None
        return split_at(self.fx, layer.name, [t for m in layer.modules() for t in module_tensors(m)])


def discover_layers(module: nn.Module, example: torch.Tensor, aliases: Mapping[str, str] | None = None) -> list[Layer]:
    """The Conv/Linear layers of ``module`` in forward order (see :meth:`ModelGraph.of`)."""
    return ModelGraph.of(module, example, aliases).layers
