"""Cutting a traced network: the torch.fx side of the model graph.

A **torch.fx trace** (timm's own lists of modules and functions to keep whole), in which every
in-place op that writes into a tensor read later is made an explicit dependency, so that the fast
engine can cut the network at a layer (:func:`split_at`) and step from one cut to the next
(:func:`transition`) without losing a data dependency.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lesionbench.layers import layer_types
from lesionbench.probe import module_tensors, storages


def _timm_trace_helpers() -> tuple[tuple[type, ...], tuple]:
    """timm's public lists of modules to keep whole and functions to leave untraced (TF "SAME" padding…).

    Empty while timm is not imported: a model can hold a timm module or call a timm function only
    once timm is imported, and importing it for nothing costs 1.8 CPU s (it imports torchvision).
    """
    if "timm" not in sys.modules:
        return (), ()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        try:  # timm releases before the lists were exported from timm.layers
            from timm.models import get_notrace_functions, get_notrace_modules
        except ImportError:  # a timm that exports neither list: plain tracing only
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


_INPLACE_FUNCTIONS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ipow,
    operator.ifloordiv,
    operator.imod,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
}
_VIEW_METHODS = {
    "view",
    "view_as",
    "reshape",
    "transpose",
    "permute",
    "t",
    "expand",
    "expand_as",
    "narrow",
    "select",
    "squeeze",
    "unsqueeze",
    "flatten",
    "unflatten",
    "chunk",
    "split",
    "unbind",
    "as_strided",
    "diagonal",
    "movedim",
    "swapaxes",
    "__getitem__",
    "unfold",
    "detach",
}
_VIEW_FUNCTIONS = {
    operator.getitem,
    torch.flatten,
    torch.transpose,
    torch.permute,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    torch.narrow,
    torch.select,
    torch.unbind,
    torch.movedim,
}


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


class _TensorNodes(fx.Interpreter):
    """The nodes of a graph whose value, on one run, is or holds a ``torch.Tensor``.

    What :class:`torch.fx.passes.shape_prop.ShapeProp` records as ``tensor_meta``, without its cost
    and noise: ShapeProp imports sympy (0.5 CPU s) for symbolic shapes nobody here uses, and prints
    a traceback to stderr when a node fails, which lesionbench reports in one line instead.
    """

    def nodes(self, example: torch.Tensor) -> set[fx.Node]:
        self._holding: set[fx.Node] = set()
        self.run(example)
        return self._holding

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        found = []
        fx.node.map_aggregate(result, lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
        if found:
            self._holding.add(n)
        return result


def make_inplace_explicit(gm: fx.GraphModule, example: torch.Tensor) -> str:
    """Rewire the graph so that everything reading a tensor after an in-place write reads the write.

    ``x.add_(f(x))`` as a statement leaves later nodes reading ``x``'s producer, so the graph would
    say they do not depend on ``f``; an in-place op returns the tensor it wrote, so pointing later
    readers at it changes no value and restores the dependency. Which nodes hold tensors comes from
    running the graph once on ``example`` (:class:`_TensorNodes`). Returns why the graph cannot be
    made safe ("" when it can): a write into a *view* changes its base too, which no rewiring of the
    view's readers covers.
    """
    try:
        holding = _TensorNodes(gm).nodes(example)
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
        if target is None or target not in holding:
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
