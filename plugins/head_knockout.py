"""Attention-head knockout (Michel, Levy & Neubig 2019, *Are Sixteen Heads Really Better than One?*).

The units are an attention module's query heads. Level p knocks out floor(p·H) of its H heads,
chosen at random: each chosen head's output (its attention-weighted values, the head's slice of the
output projection's input) is set to zero, so its contribution to the attention output — its
columns of ``o_proj``/``c_proj``/``proj`` times that output — is exactly zero, whatever the inputs
(Michel et al.'s head mask ξ_h = 0). q, k and v are left as they are: with grouped-query attention a
key/value head is shared by ``num_key_value_groups`` query heads, and knocking out one of them must
not silence the others. The layer axis is the attention module (``model.layers.3.self_attn``,
GPT-2 ``transformer.h.3.attn``, timm ViT/DeiT ``blocks.3.attn`` — the head-level view of its
``attn.qkv``/``attn.proj``) holding one of the study's layers. See :mod:`lesionbench.transformer_parts`.
"""

from __future__ import annotations

import torch

from lesionbench import (
    HookPerturbation,
    LevelAxis,
    attention_heads,
    count_for,
    display_names,
    head_features,
    hookimpl,
    targets_holding,
    zero_features,
)

LEVELS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


class HeadKnockout(HookPerturbation):
    def targets(self, model, layers):
        return targets_holding(model, layers, attention_heads, "attention", display_names(layers))

    def hooks(self, layer, level, generator):
        heads = attention_heads(layer.module)
        k = count_for(level, heads.count)
        if k == 0:
            return []
        chosen = torch.randperm(heads.count, generator=generator)[:k]
        return [zero_features(heads.out, head_features(heads, chosen))]


@hookimpl
def lesionbench_perturbations():
    return [
        HeadKnockout(
            name="head_knockout",
            description="Zero the output of a random fraction p of an attention module's heads (its o_proj input slices).",
            default_levels=LEVELS,
            level_range=(0.0, 1.0),
            axis=LevelAxis("fraction p of attention heads knocked out"),
        )
    ]
