"""The offline default model: an AlexNet-shaped network for 28×28 grey images (Fashion-MNIST).

Five conv and three fully connected layers named ``conv1``…``fc8`` as in AlexNet, so the default
study reads like the paper's. Its weights ship in ``models/weights/`` and are reproduced by
``lesionbench train fashion_alexnet`` (the exact command and test accuracy are in the JSON
beside them).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from torchvision import transforms

from benchmark.errors import LesionbenchError
from benchmark.hookspecs import hookimpl
from benchmark.models import LoadedModel, ModelSpec, load_checkpoint_into

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


def grey_28_preprocess() -> transforms.Compose:
    """PIL image -> 1×28×28 tensor normalised with Fashion-MNIST's mean and std."""
    return transforms.Compose(
        [
            transforms.Grayscale(1),
            transforms.Resize((28, 28)),
            transforms.ToTensor(),
            transforms.Normalize((FASHION_MEAN,), (FASHION_STD,)),
        ]
    )


ARCHITECTURES = {"fashion_alexnet": FashionAlexNet}


def weights_path(arch: str) -> Path:
    return WEIGHTS_DIR / f"{arch}.pt"


def training_record(arch: str) -> dict | None:
    """The JSON written next to shipped weights by ``lesionbench train`` (command, accuracy)."""
    meta = WEIGHTS_DIR / f"{arch}.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


class DefaultModels:
    name = "lesionbench"
    description = "Small networks for 28×28 grey images shipped with lesionbench (weights trained by `lesionbench train`)."

    def claims(self, arch: str) -> bool:
        return arch in ARCHITECTURES

    def examples(self) -> list[str]:
        return sorted(ARCHITECTURES)

    def build(self, spec: ModelSpec) -> LoadedModel:
        if spec.arch not in ARCHITECTURES:
            from benchmark.errors import unknown_name

            raise unknown_name("model", spec.arch, ARCHITECTURES)
        options = dict(spec.options)
        module = ARCHITECTURES[spec.arch](**options)
        if spec.checkpoint:
            load_checkpoint_into(module, spec.checkpoint)
        elif spec.weights in (None, "default"):
            path = weights_path(spec.arch)
            if not path.is_file():
                raise LesionbenchError(
                    f"no shipped weights for {spec.arch!r} at {path}; run `lesionbench train {spec.arch}`"
                )
            load_checkpoint_into(module, path)
        elif spec.weights != "none":
            load_checkpoint_into(module, spec.weights)
        return LoadedModel(
            name=spec.ref,
            module=module.eval(),
            num_classes=module.fc8.out_features,
            input_size=(module.conv1.in_channels, 28, 28),
            preprocess=grey_28_preprocess(),
            preprocess_key=f"grey28:{FASHION_MEAN}:{FASHION_STD}",
        )


@hookimpl
def lesionbench_models():
    return [DefaultModels()]
