"""The parts of a transformer that its perturbations act on: attention heads, MLP neurons, blocks.

Found by attributes, not by class, so that Hugging Face transformers (LLaMA/SmolLM2, GPT-2 with
its ``Conv1D``) and timm's ViT/DeiT are all read the same way:

- an **attention module** has an output projection (``o_proj``, ``out_proj``, ``c_proj`` or
  ``proj``) whose input is the concatenation of its heads' outputs, head h at features
  h·d … (h+1)·d − 1, and a head count (``num_heads``, ``num_attention_heads``, ``n_head`` or its
  ``config.num_attention_heads``); with grouped-query attention (``num_key_value_groups`` g > 1)
  query heads h and h' share their key/value head when h // g = h' // g;
- an **MLP** has an input projection and an output projection (``down_proj``; ``c_fc`` → ``c_proj``;
  ``fc1`` → ``fc2``) whose input features are its hidden neurons;
- the **blocks** are the children of the longest ``nn.ModuleList``/``nn.Sequential`` whose
  children are all of one class, with parameters of the same names and shapes, and each hold an
  attention module (``model.layers``, ``transformer.h``, ViT ``blocks``); of lists equally long,
  the innermost (the last in ``named_modules`` order). Blocks alike in their parameters keep their
  input's shape in any transformer; a list of blocks that change width (a stack of stacks whose
  first embeds the input) is not a transformer's blocks.

Each damage is done through a forward pre-hook on the output projection that zeroes chosen input
features: exactly what "the head's (the neuron's) output is zero" means, for ``nn.Linear`` and
``Conv1D`` alike (both read features from the last dimension).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lesionbench.errors import LesionbenchError
from lesionbench.layers import Layer

OUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "proj")
MLP_PROJECTIONS = (("up_proj", "down_proj"), ("c_fc", "c_proj"), ("fc1", "fc2"))


@dataclass(frozen=True)
class Heads:
    """An attention module's heads: ``count`` query heads of ``dim`` features, ``groups`` query heads
    per key/value head (1 without grouped-query attention), and the output projection they feed."""

    count: int
    dim: int
    groups: int
    out: nn.Module


def _head_count(module: nn.Module) -> int | None:
    for name in ("num_heads", "num_attention_heads", "n_head"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else None


def _in_features(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    # nn.Linear stores [out, in]; transformers' Conv1D [in, out] (it has an ``nf`` = out features)
    return int(weight.shape[0]) if hasattr(module, "nf") else int(weight.shape[1])


def attention_heads(module: nn.Module) -> Heads | None:
    """The heads of an attention module (see the module doc), None for any other module."""
    if "attention" not in type(module).__name__.lower():
        return None
    count = _head_count(module)
    out = next((getattr(module, n) for n in OUT_PROJECTIONS if isinstance(getattr(module, n, None), nn.Module)), None)
    if count is None or out is None:
        return None
    features = _in_features(out)
    if features is None or features % count:
        return None
    groups = getattr(module, "num_key_value_groups", 1)
    return Heads(count, features // count, groups if isinstance(groups, int) and groups > 0 else 1, out)


def mlp_output(module: nn.Module) -> nn.Module | None:
    """The output projection of an MLP (see the module doc), None for any other module."""
    if "attention" in type(module).__name__.lower():
        return None
    for first, last in MLP_PROJECTIONS:
        if isinstance(getattr(module, first, None), nn.Module) and isinstance(getattr(module, last, None), nn.Module):
            return getattr(module, last)
    return None


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks (path, module), in order; empty when it has none."""
    best: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or not len(module):
            continue
        children = list(module.named_children())
        if len({type(c) for _n, c in children}) != 1 or len({_shapes(c) for _n, c in children}) != 1:
            continue
        if all(any(attention_heads(m) is not None for m in c.modules()) for _n, c in children):
            if len(children) >= len(best):
                best = [(f"{path}.{n}" if path else n, c) for n, c in children]
    return best


def _shapes(module: nn.Module) -> tuple:
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def targets_holding(
    model: nn.Module,
    layers: Sequence[Layer],
    found: Callable[[nn.Module], object],
    kind: str,
    names: dict[str, str] | None = None,
) -> list[Layer]:
    """One Layer per module of ``model`` for which ``found`` is not None and that holds one of
    ``layers``, in forward order; its index and depth are those of the first of ``layers`` inside
    it (so tables and depth plots put it in place). ``names`` maps module paths to display names."""
    names = names or {}
    out = []
    for path, module in model.named_modules():
        if not path or found(module) is None:
            continue
        inside = {id(m) for m in module.modules()}
        hits = [l for l in layers if id(l.module) in inside]
        if hits:
            first = min(hits, key=lambda l: l.index)
            out.append(
                Layer(
                    name=path,
                    display=names.get(path, path),
                    index=first.index,
                    relative_depth=first.relative_depth,
                    kind=kind,
                    module=module,
                )
            )
    return sorted(out, key=lambda l: (l.index, l.name))


def display_names(layers: Sequence[Layer]) -> dict[str, str]:
    """Display names of containers, from the aliases of the layers inside them: when ``a.b.c``
    is shown as ``x.c``, ``a.b`` is shown as ``x`` (a wrapped LM shows transformers' own paths)."""
    out = {}
    for layer in layers:
        parts, shown = layer.name.split("."), layer.display.split(".")
        for k in range(1, min(len(parts), len(shown))):
            if parts[-k:] != shown[-k:]:
                break
            out[".".join(parts[:-k])] = ".".join(shown[:-k])
    return out


def zero_features(module: nn.Module, features: torch.Tensor) -> RemovableHandle:
    """A forward pre-hook on ``module`` that zeroes input features ``features`` (int64 [k], last
    dimension) of its first argument; returns its handle."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        keep = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        keep[features.to(x.device)] = 0
        return (x * keep, *args[1:])

    return module.register_forward_pre_hook(hook)


def head_features(heads: Heads, chosen: torch.Tensor) -> torch.Tensor:
    """The output-projection input features of query heads ``chosen`` (int64 [k]): int64 [k·dim]."""
    return (chosen[:, None] * heads.dim + torch.arange(heads.dim)[None, :]).reshape(-1)


def block_input(name: str, args: tuple, kwargs: dict, output) -> torch.Tensor:
    """A block's input hidden states (its first argument, or ``hidden_states``) when its output (the
    first entry of a tuple) has their shape. Raises LesionbenchError naming the block otherwise."""
    x = args[0] if args else kwargs.get("hidden_states")
    first = output[0] if isinstance(output, tuple) else output
    if not isinstance(x, torch.Tensor) or not isinstance(first, torch.Tensor) or x.shape != first.shape:
        shapes = f"{_shape(x)} in, {_shape(first)} out"
        raise LesionbenchError(f"block {name!r} does not keep its input's shape ({shapes}), so it cannot be removed")
    return x


def _shape(value) -> str:
    return "×".join(map(str, value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def identity_hook(name: str) -> Callable:
    """A forward hook that replaces a block's output by its input hidden states (the block removed);
    a tuple output keeps its other entries. Raises LesionbenchError when the shapes differ."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict, output):
        x = block_input(name, args, kwargs, output)
        return (x, *output[1:]) if isinstance(output, tuple) else x

    return hook


def keeps_shape_hook(name: str) -> Callable:
    """A forward hook that checks what :func:`identity_hook` needs (the block's output has its input's
    shape) and changes nothing: the plan-time check of block removal. Raises LesionbenchError."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        block_input(name, args, kwargs, output)

    return hook
