"""torchvision's model zoo: any ``torchvision:NAME`` through ``torchvision.models.get_model``.

``weights`` takes a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``) and the
preprocessing then comes from that weights entry's own ``transforms()``. AlexNet's layers get the
paper's names conv1…conv5, fc6…fc8.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING

from lesionbench.errors import LesionbenchError, unknown_name
from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel, ModelSpec, load_checkpoint_into

if TYPE_CHECKING:  # torchvision is imported where it is used: `lesionbench list` stays light
    from torchvision import transforms

ALEXNET_ALIASES = {
    "features.0": "conv1",
    "features.3": "conv2",
    "features.6": "conv3",
    "features.8": "conv4",
    "features.10": "conv5",
    "classifier.1": "fc6",
    "classifier.4": "fc7",
    "classifier.6": "fc8",
}
ALIASES = {"alexnet": ALEXNET_ALIASES}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_eval_transform(size: int = 224, resize: int = 256) -> transforms.Compose:
    """The usual resize-256, centre-crop-224, ImageNet mean/std transform (for weights-less models)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def rgb(transform):
    """Convert any PIL mode to RGB before ``transform``: grey datasets fed to colour models."""
    from torchvision import transforms

    return transforms.Compose([transforms.Lambda(lambda im: im.convert("RGB")), transform])


class TorchvisionModels:
    name = "torchvision"
    description = "torchvision.models by name, with torchvision weights (e.g. weights='IMAGENET1K_V1')."

    def claims(self, arch: str) -> bool:
        return False  # always addressed with the prefix, to keep names unambiguous

    def examples(self) -> list[str]:
        return ["alexnet", "vgg16", "resnet18", "mobilenet_v3_small"]

    def build(self, spec: ModelSpec) -> LoadedModel:
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if spec.arch not in available:
            raise unknown_name("torchvision model", spec.arch, available)
        weights_enum = None
        if spec.weights not in (None, "none"):
            enum = torchvision.models.get_model_weights(spec.arch)
            try:
                weights_enum = enum[spec.weights]  # "DEFAULT" is an alias member of every enum
            except KeyError:
                raise unknown_name(f"weights for torchvision:{spec.arch}", spec.weights, enum.__members__) from None
        try:
            module = torchvision.models.get_model(spec.arch, weights=weights_enum, **dict(spec.options))
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # offline, or a corrupt cached file
            raise LesionbenchError(
                f"could not load {spec.weights} weights for torchvision:{spec.arch} "
                f"(offline? place {weights_enum.url.rsplit('/', 1)[-1]} in $TORCH_HOME/hub/checkpoints): "
                f"{str(exc).splitlines()[0]}"
            ) from None
        if spec.checkpoint:
            load_checkpoint_into(module, spec.checkpoint)
        if weights_enum is not None:
            preprocess = weights_enum.transforms()
            key = f"torchvision:{weights_enum}"
        else:
            preprocess = imagenet_eval_transform()
            key = "imagenet:256:224:meanstd"
        size = getattr(preprocess, "crop_size", [224])[0] if weights_enum is not None else 224
        return LoadedModel(
            name=spec.ref,
            module=module.eval(),
            input_size=(3, size, size),
            preprocess=rgb(preprocess),
            preprocess_key=key,
            aliases=dict(ALIASES.get(spec.arch, {})),
        )


@hookimpl
def lesionbench_models():
    return [TorchvisionModels()]
