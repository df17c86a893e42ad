"""The model graph: one analysis of a network that every later step asks its questions of.

Two views of the same network, each built once per model:

* a **probe**, one forward pass of a one-image input under a :class:`TorchFunctionMode` that sees
  every torch function the network calls, with which tensors. It answers which Conv/Linear layers
  the forward pass uses and in what order (by the first read of their weight, so a layer used
  through a functional call — ``nn.MultiheadAttention.out_proj`` — counts, and declaration order
  does not), which BatchNorm each layer's output units feed (through elementwise activations,
  in place or not, at every use of a module called more than once), which BatchNorms lie
  downstream of a layer on any branch (what a damage can reach), and the model's output;
* a **torch.fx trace** (timm's own lists of modules and functions to keep whole), in which every
  in-place op that writes into a tensor read later is made an explicit dependency, so that the
  fast engine can cut the network at a layer (:func:`split_at`) and step from one cut to the next
  (:func:`transition`) without losing a data dependency.

Weights are compared by storage, not by object: a Parameter that views another's memory is the
same weight (a tie).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lesionbench.errors import LesionbenchError
from lesionbench.evaluate import logits_of
from lesionbench.layers import NORMS, Layer, is_layer, kind_of, layer_types, unit_axis_of
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
}  # fmt: skip


def storages(tensors: Sequence[torch.Tensor]) -> set[int]:
    """Where the tensors' bytes live: two tensors sharing memory share an entry."""
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def unsupported_weight(module: nn.Module) -> str:
    """Why damage to ``module``'s stored weight would not reach its forward pass ("" if it would)."""
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

    def moved(self, start: int, stop: int) -> UnitSpan | None:
        """The span in the slice ``[start, stop)`` of its axis (positions renumbered from ``start``)."""
        lo, hi = max(self.lo, start - self.shift), min(self.hi, stop - self.shift)
        return UnitSpan(self.layer, self.axis, self.shift - start, lo, hi) if lo < hi else None


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
                    out.append(UnitSpan(span.layer, span.axis, span.shift + offset * (span.axis == axis), span.lo, span.hi))
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
                kept.append(UnitSpan(s.layer, at - t.dim(), s.shift, s.lo, s.hi))
        return [tuple(kept)] + none[1:]
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

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        read = [self.layer_of[id(t)] for t in inputs if id(t) in self.layer_of]
        for layer in read:
            if layer not in self.order:
                self.order.append(layer)
        taint = frozenset().union(*(self.taint.get(id(t), frozenset()) for t in inputs), read)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "batch_norm" and first is not None:
            norm = next((self.norm_of[id(t)] for t in inputs if id(t) in self.norm_of), None)
            if norm is not None:
                for span in self.units.get(id(first), ()):
                    fed = self.feeds.setdefault(span.layer, [])
                    if span.axis == 1 - first.dim() and (norm, span) not in fed:  # units on the norm's channels
                        fed.append((norm, span))
                for layer in self.taint.get(id(first), ()):
                    if norm not in self.downstream.setdefault(layer, []):
                        self.downstream[layer].append(norm)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
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
        elif isinstance(m, NORMS):
            for t in module_tensors(m):
                norm_of[id(t)] = m
    watch = _Watch(layer_of, norm_of)
    output = run_once(module, example, watch)
    return Probe(watch.order, watch.feeds, watch.downstream, output)


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

    Build with :meth:`of`. ``layers`` are every Conv/Linear (not transposed) module whose stored
    weight the forward pass reads, in the order of the first read; ``left_out`` says, per module
    path, why a Conv/Linear is not among them.
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
        left_out = {}
        for name, m in module.named_modules():
            if is_layer(m) and m not in seen.order:
                left_out[name] = unsupported_weight(m) or "the forward pass never reads its weight"
        n = len(seen.order)
        layers = []
        for i, m in enumerate(seen.order):
            name = names[m]
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
        self.fx
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
