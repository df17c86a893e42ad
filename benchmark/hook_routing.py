"""Hooks that reach a layer however the model applies it.

A hook perturbation damages what a layer computes through forward hooks on its module, which run
only when the module is called. Some models apply a layer's weight without calling its module
(``F.linear(x, layer.weight, layer.bias)``, ``layer.forward(x)``), and ``nn.MultiheadAttention``
reads its ``out_proj`` weight inside ``F.multi_head_attention_forward``. The two
:class:`~torch.overrides.TorchFunctionMode` here make those hooks run there too;
:func:`lesionbench.perturbation.perturbed` enters them for the cells that need them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lesionbench.layers import Layer

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
