"""timm's model zoo: any ``timm:NAME`` through ``timm.create_model``.

``weights="pretrained"`` downloads from the hub when online; ``weights=PATH`` loads a local file
through timm's own pretrained path (``pretrained_cfg_overlay=dict(file=PATH)``), so offline
machines use the very same code. Preprocessing comes from timm's ``resolve_data_config``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
from torchvision import transforms
from timm.data import create_transform, resolve_data_config

from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel, ModelSpec, load_checkpoint_into, load_state_dict
from lesionbench.models.torchvision_models import rgb


def timm_preprocess(module, in_chans: int):
    """timm's eval transform for ``module`` and a key that identifies it.

    timm's data config describes the pretrained 3-channel input even for a model built with another
    ``in_chans``; for one channel the image is read as grey and normalised with the mean of the
    three channels' statistics, and the input size says 1 channel.
    """
    config = dict(resolve_data_config({}, model=module))
    if in_chans != 3:
        config["input_size"] = (in_chans, *config["input_size"][1:])
        config["mean"] = (sum(config["mean"]) / 3,) * in_chans
        config["std"] = (sum(config["std"]) / 3,) * in_chans
    transform = create_transform(**config, is_training=False)
    key = "timm:" + ",".join(f"{k}={config[k]}" for k in sorted(config))
    if in_chans == 3:
        transform = rgb(transform)
    elif in_chans == 1:
        transform = transforms.Compose([transforms.Lambda(lambda im: im.convert("L")), transform])
    return transform, key, tuple(config["input_size"])


def _file_num_classes(arch: str, state) -> int | None:
    """Output units of the classifier in a weights file, by the classifier name timm's config gives."""
    cfg = timm.get_pretrained_cfg(arch)
    names = getattr(cfg, "classifier", None) or ()
    for name in (names,) if isinstance(names, str) else names:
        for key in (f"{name}.weight", f"module.{name}.weight"):
            if key in state:
                return int(state[key].shape[0])
    return None


def loaded_timm_model(name: str, module, in_chans: int) -> LoadedModel:
    """A timm module with timm's own eval preprocessing, ready for a study."""
    preprocess, key, input_size = timm_preprocess(module, in_chans)
    return LoadedModel(
        name=name,
        module=module.eval(),
        input_size=input_size,
        preprocess=preprocess,
        preprocess_key=key,
    )


class TimmModels:
    name = "timm"
    description = "timm.create_model by name; weights='pretrained' (hub) or a local weights file."

    def claims(self, arch: str) -> bool:
        return False

    def examples(self) -> list[str]:
        return ["resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_large_100", "vgg11"]

    def build(self, spec: ModelSpec) -> LoadedModel:
        if not timm.is_model(spec.arch):
            from lesionbench.errors import unknown_name

            nearest = difflib.get_close_matches(spec.arch, timm.list_models(), n=20, cutoff=0.0)
            raise unknown_name("timm model", spec.arch, nearest)
        kwargs = dict(spec.options)
        if spec.weights in (None, "none"):
            module = timm.create_model(spec.arch, pretrained=False, **kwargs)
        elif spec.weights == "pretrained":
            try:
                module = timm.create_model(spec.arch, pretrained=True, **kwargs)
            except Exception as exc:  # hub unreachable, gated, ...
                raise LesionbenchError(
                    f"could not fetch pretrained weights for timm:{spec.arch} "
                    f"(offline? pass weights='PATH' to a local file): {str(exc).splitlines()[0]}"
                ) from None
        else:
            path = Path(spec.weights)
            state = load_state_dict(path)  # refuse pickles and non-state-dicts with our own message first
            overlay = dict(file=str(path))
            classes = _file_num_classes(spec.arch, state)
            if classes is not None:  # else timm drops a classifier whose size differs from its hub weights'
                overlay["num_classes"] = classes
            try:
                module = timm.create_model(spec.arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            except RuntimeError as exc:  # keys or shapes of another architecture
                lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
                raise LesionbenchError(
                    f"weights file {str(path)!r} does not fit timm:{spec.arch}: {' '.join(lines[:2])[:300]}"
                ) from None
        if spec.checkpoint:
            load_checkpoint_into(module, spec.checkpoint)
        return loaded_timm_model(spec.ref, module, int(kwargs.get("in_chans", 3)))


@hookimpl
def lesionbench_models():
    return [TimmModels()]
