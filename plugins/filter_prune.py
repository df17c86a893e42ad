"""Filter pruning by norm (Li et al. 2017, *Pruning Filters for Efficient ConvNets*): the
structured, norm-ranked pruning that layer-wise sensitivity analysis reports (Distiller, NNI's
``SensitivityAnalysis``, PaddleSlim).

Level p silences the floor(p·n_out) output units of the layer whose weights have the smallest
norm — L1 (``filter_prune``, Li et al.'s Σ|w| over a filter's in-channels × kernel) or L2
(``filter_prune_l2``, √Σw²) — taken over the unit's weight slice W[u] only (the bias is not
ranked, as in the paper). A silenced unit is zeroed exactly as ``node_knockout`` silences one:
its weight slice and bias, and its channel in every BatchNorm it feeds (scale, shift and running
mean), so that it emits zero after normalisation. Only which units are chosen differs: the
weakest here, random there — "informed vs random" at the same level.

Norms are computed on the CPU in float64 from the stored values (for an int8 layer that exposes
``dequantized_weight()``, from the values it stands for: its per-channel scale times its integer
code), so a level's choice is the same on every device. **Ties** (equal norms, e.g. units already
all zero) are broken by unit index: among equal norms the lower-numbered unit is pruned first
(a stable sort). There is no randomness: the plugin is ``deterministic``, so the harness evaluates
one draw per level.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lesionbench import Layer, LevelAxis, WeightPerturbation, count_for, hookimpl
from lesionbench.damage import FRACTION_LEVELS as LEVELS
from lesionbench.damage import silence_units


def unit_norms(layer: Layer, order: int = 1) -> torch.Tensor:
    """The L1 (``order=1``) or L2 (``order=2``) norm of each output unit's weights.

    Returns a float64 CPU tensor of shape [n_out] (units are conv filters, linear rows, columns of
    transformers' ``Conv1D``: axis ``layer.unit_axis`` of the weight). For a layer whose module has
    ``dequantized_weight()`` (int8 layers), the norm is
    that of the real values the integer codes stand for.
    """
    module = layer.module
    dequantized = getattr(module, "dequantized_weight", None)
    weight = dequantized() if callable(dequantized) else module.weight
    w = layer.weight_by_unit(weight).detach().to("cpu", torch.float64)
    w = w.reshape(w.shape[0], -1)
    return torch.linalg.vector_norm(w, ord=order, dim=1)


def weakest_units(norms: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` smallest norms, ties broken by the lower index (int64, shape [k])."""
    return torch.sort(norms, stable=True).indices[:k]


class FilterPrune(WeightPerturbation):
    order: ClassVar[int] = 1

    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        k = count_for(level, layer.out_units)
        if k:
            silence_units(layer, weakest_units(unit_norms(layer, self.order), k))


class FilterPruneL2(FilterPrune):
    order: ClassVar[int] = 2


@hookimpl
def lesionbench_perturbations():
    common = dict(default_levels=LEVELS, level_range=(0.0, 1.0), deterministic=True)
    return [
        FilterPrune(
            name="filter_prune",
            description="Silence the fraction p of output units (filters / rows) with the smallest L1 norm of their weights (Li et al. 2017).",
            axis=LevelAxis("fraction p of units pruned (smallest L1 norm)"),
            **common,
        ),
        FilterPruneL2(
            name="filter_prune_l2",
            description="Silence the fraction p of output units (filters / rows) with the smallest L2 norm of their weights.",
            axis=LevelAxis("fraction p of units pruned (smallest L2 norm)"),
            **common,
        ),
    ]
