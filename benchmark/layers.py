"""What a perturbable layer is: a Conv/Linear module, where it sits, and the BatchNorms it feeds.

Layers are found by :class:`lesionbench.graph.ModelGraph` (forward order, the norms each feeds);
this module only describes them and picks the ones a study names.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lesionbench.errors import unknown_name

PERTURBABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # not transposed convs: their weight is (in, out, …)
NORMS = (nn.modules.batchnorm._BatchNorm,)  # norms with running statistics to recalibrate
# Norms with a per-channel affine (scale, shift) after their statistics: a silenced unit entering one
# would leave it as the shift, so node knockout zeroes its channel there (BatchNorm, InstanceNorm with
# affine, GroupNorm, LayerNorm / RMSNorm over the channel axis).
AFFINE_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def transposed_linear_types() -> tuple[type, ...]:
    """transformers' ``Conv1D`` (GPT-2, ImageGPT): a linear layer whose weight is stored [in, out].

    Looked up in ``sys.modules`` only: a model built from it has imported it, and lesionbench does
    not import transformers (nor need it installed) for models that do not use it.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def layer_types() -> tuple[type, ...]:
    """Every module type that is a perturbable layer: Conv1d/2d/3d, Linear, transformers' Conv1D."""
    return PERTURBABLE + transposed_linear_types()


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a perturbable layer (see :func:`layer_types`)."""
    return isinstance(module, layer_types())


def unit_axis_of(module: nn.Module) -> int:
    """The weight axis that indexes output units: 0 (conv filters, Linear rows), 1 for a weight
    stored [in, out] (transformers' Conv1D: its units are the weight's columns)."""
    return 1 if isinstance(module, transposed_linear_types()) else 0


def kind_of(module: nn.Module) -> str:
    """``"linear"`` (units on the output's last axis) or ``"conv"`` (units on axis 1)."""
    return "linear" if isinstance(module, (nn.Linear, *transposed_linear_types())) else "conv"


@dataclass(frozen=True)
class Layer:
    """A perturbable layer: where it sits in the network and what it feeds."""

    name: str  # module path, e.g. "features.0"
    display: str  # what results call it: the alias ("conv1") when the model gives one
    index: int
    relative_depth: float  # 0 = first layer, 1 = last
    kind: str  # "conv" or "linear"
    module: nn.Module = field(compare=False, repr=False)
    # The weight axis of the output units: 0, or 1 for a weight stored [in, out] (transformers' Conv1D).
    unit_axis: int = 0
    # The BatchNorms whose channels are this layer's output units (through elementwise activations;
    # one per use of a module called more than once): silencing a unit must silence them too.
    norms: tuple[nn.Module, ...] = field(default=(), compare=False, repr=False)
    norm_names: tuple[str, ...] = ()
    # Per norm, (shift, lo, hi): units lo <= u < hi reach it, as its channel u + shift (a unit passed
    # through a concatenation sits at an offset; one cut off by a slice does not reach it). Empty: every
    # unit at its own index.
    norm_spans: tuple[tuple[int, int, int], ...] = ()
    # Per norm, how many of its channels each unit fills (a conv's channel flattened with its positions
    # before a BatchNorm1d: H·W; unit u is then channels u·width + shift … + width − 1). Empty: 1 each.
    norm_widths: tuple[int, ...] = ()
    # The op that applies the weight when the module's own call does not (``multi_head_attention_forward``
    # for nn.MultiheadAttention.out_proj, ``linear`` for ``layer.forward(x)`` or ``F.linear(x, layer.weight)``):
    # a forward hook on the module never sees that output. "" when the module is called.
    applied_by: str = ""
    # A LoRA-wrapped layer (peft's layout: ``wrapper.base_layer`` + ``lora_A`` / ``lora_B`` + ``scaling``):
    # the wrapper, whose output is the layer's (base(x) + s·B(A(x))), and per adapter (A, B, s). Its
    # effective weight is base + Σ s·B·A; ``adapter_names`` are the A and B module paths, in turn.
    wrapper: nn.Module | None = field(default=None, compare=False, repr=False)
    adapters: tuple[tuple[nn.Module, nn.Module, float], ...] = field(default=(), compare=False, repr=False)
    adapter_names: tuple[str, ...] = ()
    # The layer's own tensors at initialisation (keys as in module.state_dict()), when known.
    initial: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def out_units(self) -> int:
        """Output units: filters of a conv, rows of a linear layer (columns of a Conv1D's [in, out] weight)."""
        return int(self.module.weight.shape[self.unit_axis])

    def unit_index(self, units: torch.Tensor) -> tuple:
        """An index selecting the weight entries of ``units`` (int64 [k]): ``weight[layer.unit_index(u)]``."""
        return (slice(None),) * self.unit_axis + (units,)

    def weight_by_unit(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or ``weight``, shaped like it) as a view with the output units on axis 0."""
        weight = self.module.weight if weight is None else weight
        return weight.movedim(self.unit_axis, 0)

    def weight_and_bias(self) -> list[torch.Tensor]:
        """The layer's weight, then its bias if it has one: the order perturbations draw in."""
        bias = self.module.bias
        return [self.module.weight] + ([bias] if bias is not None else [])

    def norm_channels(self, units: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
        """Each norm the layer feeds with the channels of it that carry ``units`` (int64 [k])."""
        out = []
        spans = self.norm_spans or [(0, 0, self.out_units)] * len(self.norms)
        widths = self.norm_widths or [1] * len(self.norms)
        for norm, (shift, lo, hi), width in zip(self.norms, spans, widths):
            reached = units[(units >= lo) & (units < hi)]
            if reached.numel():
                span = torch.arange(width, device=reached.device)
                out.append((norm, (reached[:, None] * width + shift + span).reshape(-1)))
        return out

    @property
    def output_module(self) -> nn.Module:
        """The module whose output is the layer's output (the LoRA wrapper, else the layer's module)."""
        return self.wrapper if self.wrapper is not None else self.module

    def adapter_modules(self) -> list[nn.Module]:
        return [m for a, b, _s in self.adapters for m in (a, b)]

    def merge_adapters(self) -> None:
        """Fold every LoRA adapter into the base weight (W ← W + s·B·A, B ← 0), in place: the forward
        pass computes the same function, and the stored weight is now the effective one, which a
        weight perturbation then damages. The harness's snapshot (which covers the adapters) undoes it."""
        with torch.no_grad():
            for a, b, scale in self.adapters:
                delta = (b.weight.flatten(1).float() @ a.weight.flatten(1).float()) * scale  # [out, in·kernel]
                weight = self.module.weight
                delta = delta.t() if self.unit_axis == 1 else delta.view(-1, *a.weight.shape[1:])
                weight += delta.to(weight.dtype)
                b.weight.zero_()

    def modules(self) -> list[nn.Module]:
        """The modules a perturbation of this layer may change (the layer, its LoRA adapters and the norms it feeds)."""
        return [self.module, *self.adapter_modules(), *self.norms]

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's, its adapters' and its norms' parameters and buffers, under their names in the model."""
        out = {}
        named = [
            (self.name, self.module),
            *zip(self.adapter_names, self.adapter_modules()),
            *zip(self.norm_names, self.norms),
        ]
        for prefix, module in named:
            for kind in (module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
                out.update({f"{prefix}.{k}": t for k, t in kind})
        return out


def select_layers(layers: Sequence[Layer], wanted: Sequence[str] | None) -> list[Layer]:
    """The layers named in ``wanted`` (aliases or module paths), in forward order; all when empty."""
    if not wanted:
        return list(layers)
    by_name = {}
    for layer in layers:
        by_name[layer.name] = layer
        by_name[layer.display] = layer
    chosen = set()
    for name in wanted:
        if name not in by_name:
            raise unknown_name("layer", name, [l.display for l in layers])
        chosen.add(by_name[name].index)
    return [l for l in layers if l.index in chosen]


def spread_layers(layers: Sequence[Layer], count: int) -> list[Layer]:
    """``count`` layers at the relative depths 0, 1/(count−1), …, 1, in forward order.

    Each depth takes the layer whose ``relative_depth`` (index / (layers − 1)) is nearest, the
    shallower one on a tie, so models with different layer names are studied at the same depths.
    A model with fewer layers than ``count`` gives each of its layers once.
    """
    if count < 2:
        raise ValueError(f"count must be at least 2, got {count}")
    chosen: list[Layer] = []
    for k in range(count):
        depth = k / (count - 1)
        nearest = min(layers, key=lambda l: (round(abs(l.relative_depth - depth), 9), l.index))  # ties: exact
        if nearest not in chosen:
            chosen.append(nearest)
    return chosen
