"""Whole-block removal for transformers (layer dropping): a block replaced by the identity.

Gromov et al. 2024 (*The Unreasonable Ineffectiveness of the Deeper Layers*) and Men et al. 2024
(*ShortGPT*) drop whole decoder blocks of LLMs; Lad et al. 2024 (*The Remarkable Robustness of
LLMs: Stages of Inference?*) delete single ones and find the first and last critical. A block of a
pre-norm transformer computes x + attn(norm(x)) and then + mlp(norm(·)); removing it passes its
input hidden states x on unchanged (a forward hook discards what it computed). The layer axis is
the block: every transformer block of the model (``model.layers.N``, GPT-2 ``transformer.h.N``,
ViT ``blocks.N``) is a target, whatever the study's layers, at relative depth N/(blocks − 1).
Level 1 removes the block, 0 is the clean model; deterministic (one draw). A block that does not keep
its input's shape is refused before the study starts (``check_hooks``).
"""

from __future__ import annotations

from lesionbench import (
    HookPerturbation,
    Layer,
    LesionbenchError,
    LevelAxis,
    display_names,
    hookimpl,
    identity_hook,
    keeps_shape_hook,
    transformer_blocks,
)


class BlockDrop(HookPerturbation):
    def targets(self, model, layers):
        blocks = transformer_blocks(model)
        names = display_names(layers)
        last = max(len(blocks) - 1, 1)
        return [
            Layer(
                name=path, display=names.get(path, path), index=i, relative_depth=i / last, kind="block", module=module
            )
            for i, (path, module) in enumerate(blocks)
        ]

    def check_level(self, level):
        if level not in (0.0, 1.0):
            raise LesionbenchError(f"block_drop takes levels 0 (kept) and 1 (removed), got {level}")

    def check_hooks(self, layer):
        """Before the study: a block whose output has another shape than its input cannot be removed."""
        return [layer.module.register_forward_hook(keeps_shape_hook(layer.display), with_kwargs=True)]

    def hooks(self, layer, level, generator):
        if level == 0:
            return []
        return [layer.module.register_forward_hook(identity_hook(layer.name), with_kwargs=True)]


@hookimpl
def lesionbench_perturbations():
    return [
        BlockDrop(
            name="block_drop",
            description="Replace a whole transformer block by the identity (its input passes on): layer dropping.",
            default_levels=(0.0, 1.0),
            level_range=(0.0, 1.0),
            axis=LevelAxis("block removed (1) or kept (0)"),
            deterministic=True,
        )
    ]
