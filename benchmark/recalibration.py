"""BatchNorm statistics re-estimated after the damage (the study option ``bn_recalibrate``).

For each damaged cell, the BatchNorms the damage reaches (:func:`norms_reached`, found once per
block) have their running statistics re-estimated on a calibration subset (:func:`recalibrate`);
:func:`lesionbench.perturbation.perturbed` restores the clean statistics after the cell.
"""

from __future__ import annotations

import torch
from torch import nn

from lesionbench.graph import ModelGraph
from lesionbench.layers import Layer, is_layer


def norms_reached(graph: ModelGraph, layer: Layer) -> list[nn.Module]:
    """The BatchNorms whose input the damage reaches, on any branch (a stage: through any of its layers)."""
    if is_layer(layer.module):
        return graph.norms_reached(layer)
    inside = {id(m) for m in layer.module.modules()}
    found: list[nn.Module] = []
    for inner in graph.layers:
        if id(inner.module) in inside:
            found.extend(n for n in graph.norms_reached(inner) if n not in found)
    return found


def recalibrate(
    module: nn.Module, norms: list[nn.Module], images: torch.Tensor, batch_size: int, device: torch.device
) -> None:
    """Re-estimate the running statistics of ``norms`` on ``images`` (a cumulative average), the
    rest of the network staying in eval mode; the caller restores the old statistics."""
    saved = [(m, m.momentum) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for b in range(0, len(images), batch_size):
                module(images[b : b + batch_size].to(device, non_blocking=True))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()
