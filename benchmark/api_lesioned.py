"""One layer of any module damaged exactly as a study's cell would damage it, and restored bit for bit on exit:
:func:`lesioned`, for users with their own evaluation loop (re-exported by :mod:`lesionbench.api` and as
``lesionbench.lesioned``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from lesionbench.applicability import hookable
from lesionbench.errors import LesionbenchError
from lesionbench.graph import ModelGraph, check_module
from lesionbench.kinds import perturbation_kind
from lesionbench.layers import select_layers
from lesionbench.perturbation import Perturbation, cell_seed, check_levels, generator_for, perturbed
from lesionbench.plan import model_dtype
from lesionbench.registry import Registry, get_registry


def _example_for(model: nn.Module) -> torch.Tensor | None:
    """A one-image input, when the model says its input size (timm's cfg) or starts with a Linear."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    dtype = model_dtype(model)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return torch.zeros(1, *cfg["input_size"], dtype=dtype)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features, dtype=dtype)
    return None


@contextmanager
def lesioned(
    model: nn.Module,
    layer: str,
    perturbation: str | Perturbation,
    level: float,
    *,
    seed: int = 0,
    draw: int = 0,
    model_name: str = "model",
    example: torch.Tensor | None = None,
    registry: Registry | None = None,
) -> Iterator[nn.Module]:
    """Damage one layer of ``model`` as a study's cell would, yield the model, restore it on exit.

    The damage is the one a study with seed ``seed`` draws for model ``model_name``, layer
    ``layer`` (module path or alias), level ``level`` and draw ``draw``: the same generator seed
    and the same layer analysis (``example``, one input batch, finds the BatchNorms a unit feeds;
    it may be omitted for timm models and models whose first layer is Linear). Every tensor is
    put back bit for bit on exit, also after an exception.

    Raises :class:`LesionbenchError` for an unknown layer or perturbation or a level out of range.
    """
    registry = registry or get_registry()
    p = registry.get("perturbations", perturbation) if isinstance(perturbation, str) else perturbation
    (level,) = check_levels(p, [level])
    p.check_level(level)
    if example is None:
        example = _example_for(model)
        if example is None:
            raise LesionbenchError(
                "pass example=<an input batch> so that the layer's place in the network can be found"
            )
    check_module(model, model_name)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    graph = ModelGraph.of(model, example[:1].to(device=device, dtype=model_dtype(model)))
    if layer in graph.left_out:
        raise LesionbenchError(f"layer {layer!r} cannot be perturbed: {graph.left_out[layer]}")
    (target,) = select_layers(graph.layers, [layer])
    if perturbation_kind(p.kind).hooked:
        hookable([target], p.name, model_name, True, [])
    p.check_layer(target)
    seed_value = cell_seed(seed, model_name, target.name, p.name, level, draw)
    with perturbed(target, p, level, generator_for(seed_value)):
        yield model
