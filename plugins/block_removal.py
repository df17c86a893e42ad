"""Block removal (Veit, Wilber & Belongie 2016): delete whole residual blocks, keeping the shortcut.

A residual block computes x + f(x); removing it leaves x, its identity shortcut. The layer axis is
the *stage* — the module whose children are a network's residual blocks (timm/torchvision ResNet
``layer1``, EfficientNet/MobileNet ``blocks.3``) — and level p removes floor(p·n) of the stage's n
*removable* blocks, chosen at random. A removed block's output is replaced by its input through a
forward hook (the block still runs; its result is discarded).

Which blocks are residual, and removable (identity shortcut, so output shape = input shape):

- a module with a boolean ``has_skip`` (timm's EfficientNet/MobileNet family: DepthwiseSeparableConv,
  InvertedResidual, EdgeResidual, …): removable when ``has_skip`` is True;
- a ResNet-style block, by class name (BasicBlock, Bottleneck, PreActBasic, PreActBottleneck,
  Bottle2neck, ResNestBottleneck — timm's and torchvision's) with a ``downsample`` attribute:
  removable when ``downsample`` is None or nn.Identity (no projection);
- a ConvNeXtBlock with a ``shortcut``: removable when the shortcut is nn.Identity.

Attributes alone are not trusted for other classes (a Swin stage also has ``downsample``); a stage
with a removable block whose output shape differs from its input is refused before the study starts
(``check_hooks``: one forward pass of the clean model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lesionbench.damage import FRACTION_LEVELS as LEVELS
from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import HookPerturbation, LevelAxis, count_for

DOWNSAMPLE_BLOCKS = {"BasicBlock", "Bottleneck", "PreActBasic", "PreActBottleneck", "Bottle2neck", "ResNestBottleneck"}
SHORTCUT_BLOCKS = {"ConvNeXtBlock"}


def residual(module: nn.Module) -> bool | None:
    """True for a residual block with an identity shortcut, False for one that projects, None otherwise."""
    has_skip = getattr(module, "has_skip", None)
    if isinstance(has_skip, bool):
        return has_skip
    kind = type(module).__name__
    if kind in DOWNSAMPLE_BLOCKS and hasattr(module, "downsample"):
        return module.downsample is None or isinstance(module.downsample, nn.Identity)
    if kind in SHORTCUT_BLOCKS and hasattr(module, "shortcut"):
        return isinstance(module.shortcut, nn.Identity)
    return None


def removable_blocks(stage: nn.Module) -> list[tuple[str, nn.Module]]:
    """The stage's direct children that are residual blocks with an identity shortcut, in order."""
    return [(name, child) for name, child in stage.named_children() if residual(child) is True]


def stages(model: nn.Module, layers: Sequence[Layer]) -> list[Layer]:
    """One Layer per stage holding a removable block and one of ``layers``, in forward order; its
    index and depth are those of the first of ``layers`` inside it."""
    first: dict[str, tuple[int, nn.Module]] = {}
    for path, module in model.named_modules():
        if not path or not removable_blocks(module):
            continue
        inside = {id(m) for m in module.modules()}
        hits = [l for l in layers if id(l.module) in inside]
        if hits:
            first[path] = (min(hits, key=lambda l: l.index), module)
    ordered = sorted(first.items(), key=lambda item: item[1][0].index)
    # A stage sits where its first studied layer sits, so tables and depth plots put it in place.
    return [
        Layer(
            name=path, display=path, index=layer.index, relative_depth=layer.relative_depth, kind="stage", module=module
        )
        for path, (layer, module) in ordered
    ]


def shortcut_input(name: str, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The block's input, when its output has the input's shape. Raises LesionbenchError otherwise."""
    x = inputs[0]
    if not isinstance(output, torch.Tensor) or output.shape != x.shape:
        raise LesionbenchError(f"block {name!r} does not keep its input's shape, so it has no identity shortcut")
    return x


def skip_hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
    return lambda _module, inputs, output: shortcut_input(name, inputs, output)


def shape_check_hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
    def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        shortcut_input(name, inputs, output)

    return hook


class BlockRemoval(HookPerturbation):
    def targets(self, model: nn.Module, layers: Sequence[Layer]) -> list[Layer]:
        return stages(model, layers)

    def check_hooks(self, layer: Layer) -> list[RemovableHandle]:
        """Before the study: every removable block of the stage must keep its input's shape."""
        return [
            block.register_forward_hook(shape_check_hook(f"{layer.name}.{name}"))
            for name, block in removable_blocks(layer.module)
        ]

    def hooks(self, layer: Layer, level: float, generator: torch.Generator) -> list[RemovableHandle]:
        blocks = removable_blocks(layer.module)
        k = count_for(level, len(blocks))
        if k == 0:
            return []
        chosen = torch.randperm(len(blocks), generator=generator)[:k].tolist()
        return [blocks[i][1].register_forward_hook(skip_hook(f"{layer.name}.{blocks[i][0]}")) for i in sorted(chosen)]


@hookimpl
def lesionbench_perturbations():
    return [
        BlockRemoval(
            name="block_removal",
            description="Replace a random fraction p of a stage's identity-shortcut residual blocks by their shortcut.",
            default_levels=LEVELS,
            level_range=(0.0, 1.0),
            axis=LevelAxis("fraction p of residual blocks removed"),
        )
    ]
