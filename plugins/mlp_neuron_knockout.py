"""MLP-neuron knockout: silence a random fraction of a transformer MLP's hidden neurons.

Zero ablation of neurons, as in the neuron-level ablations of interpretability work (e.g. Geva et
al. 2021, *Transformer Feed-Forward Layers Are Key-Value Memories*; Bau et al. 2019 for units of
CNNs). The units are the MLP's hidden neurons: the input features of its output projection
(``down_proj`` of a LLaMA gated MLP, after act(gate)·up; ``c_proj`` of GPT-2 after ``c_fc``; ``fc2``
of a timm ViT MLP). Level p sets floor(p·n) of the n neurons, chosen at random, to zero before the
output projection, so they add nothing to the residual stream. The layer axis is the MLP module
(``model.layers.3.mlp``) holding one of the study's layers. See :mod:`lesionbench.transformer_parts`.
"""

from __future__ import annotations

import torch

from lesionbench import (
    HookPerturbation,
    LevelAxis,
    count_for,
    display_names,
    hookimpl,
    mlp_output,
    targets_holding,
    zero_features,
)

LEVELS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def _neurons(out: torch.nn.Module) -> int:
    weight = out.weight
    return int(weight.shape[0] if hasattr(out, "nf") else weight.shape[1])  # Conv1D: [in, out]


class MLPNeuronKnockout(HookPerturbation):
    def targets(self, model, layers):
        return targets_holding(model, layers, mlp_output, "mlp", display_names(layers))

    def hooks(self, layer, level, generator):
        out = mlp_output(layer.module)
        n = _neurons(out)
        k = count_for(level, n)
        if k == 0:
            return []
        return [zero_features(out, torch.randperm(n, generator=generator)[:k])]


@hookimpl
def lesionbench_perturbations():
    return [
        MLPNeuronKnockout(
            name="mlp_neuron_knockout",
            description="Zero a random fraction p of a transformer MLP's hidden neurons (its down/output projection's inputs).",
            default_levels=LEVELS,
            level_range=(0.0, 1.0),
            axis=LevelAxis("fraction p of MLP neurons silenced"),
        )
    ]
