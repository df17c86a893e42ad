"""Finding the perturbable layers of a model: every Conv/Linear layer in forward order.

Order comes from one forward pass with hooks rather than from ``named_modules()``, because the
order modules are declared in need not be the order data flows through them. The same pass
notes which BatchNorm a layer feeds directly, so that silencing a unit can silence it downstream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmark.errors import unknown_name

PERTURBABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # not transposed convs: their weight is (in, out, …)
NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class Layer:
    """A perturbable layer: where it sits in the network and what it feeds."""

    name: str  # module path, e.g. "features.0"
    display: str  # what results call it: the alias ("conv1") when the model gives one
    index: int
    relative_depth: float  # 0 = first layer, 1 = last
    kind: str  # "conv" or "linear"
    module: nn.Module = field(compare=False, repr=False)
    norm: nn.Module | None = field(default=None, compare=False, repr=False)
    norm_name: str | None = None
    # The layer's own tensors at initialisation (keys as in module.state_dict()), when known.
    initial: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def out_units(self) -> int:
        """Output units: filters of a conv, rows of a linear layer."""
        return int(self.module.weight.shape[0])

    def weight_and_bias(self) -> list[torch.Tensor]:
        """The layer's weight, then its bias if it has one: the order perturbations draw in."""
        bias = self.module.bias
        return [self.module.weight] + ([bias] if bias is not None else [])

    def modules(self) -> list[nn.Module]:
        """The modules a perturbation of this layer may change (the layer and the norm it feeds)."""
        return [self.module] + ([self.norm] if self.norm is not None else [])


def discover_layers(
    model: nn.Module, example: torch.Tensor, aliases: Mapping[str, str] | None = None
) -> list[Layer]:
    """Run ``example`` through ``model`` once and return its Conv/Linear layers in forward order."""
    aliases = dict(aliases or {})
    names = {m: n for n, m in model.named_modules()}
    order: list[nn.Module] = []
    last_output: dict[nn.Module, torch.Tensor] = {}
    feeds: dict[nn.Module, nn.Module] = {}

    def after_layer(module, _inputs, output):
        if module not in last_output:
            order.append(module)
        last_output[module] = output

    def before_norm(norm, inputs):
        for layer, out in last_output.items():
            if inputs and inputs[0] is out and layer not in feeds:
                feeds[layer] = norm

    handles = []
    for module in model.modules():
        if isinstance(module, PERTURBABLE):
            handles.append(module.register_forward_hook(after_layer))
        elif isinstance(module, NORMS):
            handles.append(module.register_forward_pre_hook(before_norm))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    n = len(order)
    layers = []
    for i, module in enumerate(order):
        name = names[module]
        norm = feeds.get(module)
        layers.append(
            Layer(
                name=name,
                display=aliases.get(name, name),
                index=i,
                relative_depth=i / (n - 1) if n > 1 else 0.0,
                kind="linear" if isinstance(module, nn.Linear) else "conv",
                module=module,
                norm=norm,
                norm_name=names.get(norm) if norm is not None else None,
            )
        )
    return layers


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
