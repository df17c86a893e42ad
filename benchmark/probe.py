"""The forward-pass probe: one pass of a one-image input under a :class:`TorchFunctionMode`.

It sees every torch function the network calls, with which tensors, and answers which Conv/Linear
layers the pass uses and in what order (by the first read of their weight), which per-channel
affine norm each layer's output units feed (followed by :func:`lesionbench.unit_spans.follow_units`),
which layers are applied outside their module's call, which BatchNorms lie downstream of a layer,
which other weights the pass reads, and the model's output. Also here: which modules cannot be
studied and why (parametrized or pruned weights, packed quantized modules, TorchScript), and
peft's LoRA wrappers. Weights are compared by storage, not by object (a tie is one weight).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lesionbench import unit_spans
from lesionbench.errors import LesionbenchError
from lesionbench.evaluate import logits_of
from lesionbench.layers import AFFINE_NORMS, NORMS, is_layer, kind_of
from lesionbench.state import frozen_observers
from lesionbench.unit_spans import ELEMENTWISE, NORM_FUNCTIONS, UnitSpan, _layer_span, norm_channel_axis


def storages(tensors: Sequence[torch.Tensor]) -> set[int]:
    """Where the tensors' bytes live: two tensors sharing memory share an entry."""
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def unsupported_weight(module: nn.Module) -> str:
    """Why damage to ``module``'s stored weight would not reach its forward pass ("" if it would)."""
    if "weight_orig" in module._parameters and "weight_mask" in module._buffers:
        return (
            "its weight is recomputed as weight_orig × weight_mask by torch.nn.utils.prune at every call "
            "(make the pruning permanent with torch.nn.utils.prune.remove(module, 'weight') to study it)"
        )
    if parametrize.is_parametrized(module, "weight"):
        return "its weight is computed by a parametrization (weight_norm, spectral_norm, …) at every call"
    if "weight" not in module._parameters:
        return "its weight is not a stored Parameter (recomputed by a hook, e.g. the old weight_norm)"
    return ""


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
            spans = unit_spans.follow_units(name, args, kwargs, outputs, self.units)
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
        id(t): name
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.is_floating_point()
        and t.dim() >= 2
        and id(t) not in layer_of
        and id(t) not in norm_of
        and id(t) not in adapters
    }
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


def lora_wrappers(
    module: nn.Module,
) -> dict[nn.Module, tuple[nn.Module, tuple[tuple[nn.Module, nn.Module, float], ...]]]:
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
    return (
        f"a quantized {type(module).__module__}.{type(module).__name__}: its int8 weight is packed for the "
        "kernel, not a stored tensor a perturbation can change (study the float model, or int8:<model>, "
        "whose int8 layers lesionbench can damage)"
    )


def _adapter_pair(base: nn.Module, a: nn.Module, b: nn.Module) -> bool:
    """Whether B(A(x)) is a linear map with the base's layout, weight B·A (bias-free Linear pairs; for a
    conv base, A a conv like the base's (kernel, stride, padding, dilation, one group) and B a 1×1 conv)."""
    if not all(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.bias is None for m in (a, b)):
        return False
    if kind_of(base) == "linear":
        return isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
    same = ("kernel_size", "stride", "padding", "dilation")
    return (
        type(a) is type(b)
        and isinstance(base, type(a))
        and a.groups == b.groups == base.groups == 1
        and all(getattr(a, k) == getattr(base, k) for k in same)
        and set(b.kernel_size) == {1}
        and set(b.stride) == {1}
        and isinstance(b.padding, tuple)
        and set(b.padding) == {0}
    )


def check_module(module: nn.Module, name: str) -> None:
    """Refuse, in one line, a model whose layers lesionbench cannot see (a TorchScript module)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise LesionbenchError(
            f"model {name!r} is a TorchScript module (torch.jit.script / torch.jit.trace), which lesionbench does not "
            "support: its compiled forward pass makes no Python torch calls to watch and cannot be traced by torch.fx, "
            "so the layers it reads, their order and what they feed cannot be found; give the nn.Module it was "
            "scripted from"
        )
