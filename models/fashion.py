"""The Fashion-MNIST family: small networks for 28×28 grey images, with shipped weights.

- ``fashion_alexnet`` — the offline default: AlexNet's plan (5 conv + 3 fc named ``conv1``…``fc8``)
  at 28×28, so the default study reads like the paper's;
- ``fashion_vgg`` — a VGG-style stack of 3×3 convs with BatchNorm;
- ``fashion_resnet`` — timm's ``test_resnet`` (a scaled-down ResNet with residual blocks);
- ``fashion_mobilenetv3`` — timm's ``mobilenetv3_small_050`` (depthwise-separable, squeeze-excite).

Weights ship in ``models/weights/`` and are reproduced by ``lesionbench train NAME``; the exact
command, seed and measured test accuracy are in the JSON beside each file. The seed also gives the
weights training started from (``LoadedModel.initial_state``, for the ``reinit`` perturbation).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel, ModelSpec, load_checkpoint_into
from lesionbench.pixels import ToNormalisedTensor

if TYPE_CHECKING:  # torchvision is imported where it is used: `lesionbench list` stays light
    from torchvision import transforms

WEIGHTS_DIR = Path(__file__).parent / "weights"
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class FashionAlexNet(nn.Module):
    """AlexNet's plan (5 conv, 3 fc, ReLU, max-pooling, dropout before fc6/fc7) at 28×28."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, padding=1)
        self.conv5 = nn.Conv2d(128, 64, 3, padding=1)
        self.fc6 = nn.Linear(64 * 3 * 3, 256)
        self.fc7 = nn.Linear(256, 256)
        self.fc8 = nn.Linear(256, num_classes)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))  # 14×14
        x = self.pool(self.relu(self.conv2(x)))  # 7×7
        x = self.relu(self.conv3(x))
        x = self.relu(self.conv4(x))
        x = self.pool(self.relu(self.conv5(x)))  # 3×3
        x = x.flatten(1)
        x = self.relu(self.fc6(self.drop(x)))
        x = self.relu(self.fc7(self.drop(x)))
        return self.fc8(x)


def _grey(img):
    return img.convert("L")  # torchvision's Grayscale(1) on a PIL image


def _to_28(img):
    from PIL import Image

    # torchvision's Resize((28, 28)) on a PIL image: unchanged at 28×28, else a bilinear resize
    return img if img.size == (28, 28) else img.resize((28, 28), Image.BILINEAR)


def _grey_28_torchvision() -> transforms.Compose:
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Grayscale(1),
            transforms.Resize((28, 28)),
            transforms.ToTensor(),
            transforms.Normalize((FASHION_MEAN,), (FASHION_STD,)),
        ]
    )


def grey_28_preprocess() -> ToNormalisedTensor:
    """PIL image -> float 1×28×28 normalised with Fashion-MNIST's mean and std: torchvision's
    ``Compose([Grayscale(1), Resize((28, 28)), ToTensor(), Normalize(mean, std)])`` bit for bit, without
    importing torchvision (that pipeline is the fallback for inputs that are not PIL images)."""
    return ToNormalisedTensor([_grey, _to_28], (FASHION_MEAN,), (FASHION_STD,), fallback=_grey_28_torchvision)


class FashionVGG(nn.Module):
    """VGG's plan (stacks of 3×3 convs, BatchNorm, max-pooling, two fc layers) at 28×28."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_chans, 32),
            *block(32, 32),
            nn.MaxPool2d(2),  # 14×14
            *block(32, 64),
            *block(64, 64),
            nn.MaxPool2d(2),  # 7×7
            *block(64, 128),
            nn.MaxPool2d(2),  # 3×3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 9, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _timm(arch: str):
    def build(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
        import timm

        return timm.create_model(arch, num_classes=num_classes, in_chans=in_chans)

    build.__doc__ = f"timm's {arch} for 28×28 grey input."
    return build


ARCHITECTURES = {
    "fashion_alexnet": FashionAlexNet,
    "fashion_vgg": FashionVGG,
    "fashion_resnet": _timm("test_resnet"),
    "fashion_mobilenetv3": _timm("mobilenetv3_small_050"),
}


# Paper-style names for the VGG-style net, so its layers line up with AlexNet's in the leaderboard.
ALIASES = {
    "fashion_vgg": {
        "features.0": "conv1",
        "features.3": "conv2",
        "features.7": "conv3",
        "features.10": "conv4",
        "features.14": "conv5",
        "classifier.1": "fc6",
        "classifier.4": "fc7",
    },
}


def weights_path(arch: str) -> Path:
    return WEIGHTS_DIR / f"{arch}.pt"


def training_record(arch: str) -> dict | None:
    """The JSON written next to shipped weights by ``lesionbench train`` (command, accuracy)."""
    meta = WEIGHTS_DIR / f"{arch}.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def shipped_initial_state(arch: str) -> Callable[[], Mapping[str, torch.Tensor]] | None:
    """The weights training of the shipped file started from, rebuilt from its recorded seed.

    ``lesionbench train`` seeds torch and then builds the model on the CPU, so seeding the CPU
    generator and building again gives the same tensors; done under ``fork_rng`` so the caller's
    random state is left as it was. None when the record names no seed.
    """
    record = training_record(arch)
    if not record or record.get("model") != arch or not isinstance(record.get("seed"), int):
        return None
    seed, options = record["seed"], dict(record.get("options") or {})

    def initial_state() -> Mapping[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return ARCHITECTURES[arch](**options).state_dict()

    return initial_state


class FashionModels:
    name = "fashion"
    description = "Small networks for 28×28 grey images (Fashion-MNIST) with shipped weights from `lesionbench train`."

    def claims(self, arch: str) -> bool:
        return arch in ARCHITECTURES

    def examples(self) -> list[str]:
        return sorted(ARCHITECTURES)

    def build(self, spec: ModelSpec) -> LoadedModel:
        if spec.arch not in ARCHITECTURES:
            from lesionbench.errors import unknown_name

            raise unknown_name("model", spec.arch, ARCHITECTURES)
        options = dict(spec.options)
        module = ARCHITECTURES[spec.arch](**options)
        initial_state = None  # known only for the shipped weights
        if spec.checkpoint:
            load_checkpoint_into(module, spec.checkpoint)
        elif spec.weights in (None, "default"):
            path = weights_path(spec.arch)
            if not path.is_file():
                raise LesionbenchError(
                    f"no shipped weights for {spec.arch!r} at {path}; run `lesionbench train {spec.arch}`"
                )
            load_checkpoint_into(module, path)
            initial_state = shipped_initial_state(spec.arch)
        elif spec.weights != "none":
            load_checkpoint_into(module, spec.weights)
        return LoadedModel(
            name=spec.ref,
            module=module.eval(),
            input_size=(int(options.get("in_chans", 1)), 28, 28),
            preprocess=grey_28_preprocess(),
            preprocess_key=f"grey28:{FASHION_MEAN}:{FASHION_STD}",
            aliases=dict(ALIASES.get(spec.arch, {})),
            initial_state=initial_state,
        )


@hookimpl
def lesionbench_models():
    return [FashionModels()]
