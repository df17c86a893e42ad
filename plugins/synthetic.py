"""Synthetic images for scale tests and benchmarks: any size, count and number of classes, no files.

The dataset's ``path`` is not a folder but its shape, ``key=value`` pairs separated by commas
(all optional): ``n`` images (default 1000), ``size`` in pixels (square, default 224),
``classes`` (default 1000), ``channels`` (3: RGB, 1: grey; default 3) and ``seed`` (default 0),
e.g. ``--data n=50000,size=224``. Image ``i`` has label ``i % classes`` and is drawn from
``numpy.random.default_rng([seed, i])``: uniform noise plus a class-dependent colour, so the
same path gives the same images on any machine, decoded one at a time in any order.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lesionbench.data import RawDataset
from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl

DEFAULTS = {"n": 1000, "size": 224, "classes": 1000, "channels": 3, "seed": 0}


def parse_shape(path: str | None) -> dict[str, int]:
    """``"n=50000,size=224"`` → DEFAULTS updated; LesionbenchError naming a bad key or value."""
    shape = dict(DEFAULTS)
    for item in (path or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in DEFAULTS:
            raise LesionbenchError(
                f"synthetic dataset: {item.strip()!r} is not key=value with a key among {', '.join(DEFAULTS)}"
            )
        try:
            shape[key] = int(value)
        except ValueError:
            raise LesionbenchError(f"synthetic dataset: {key}={value.strip()!r} is not a whole number") from None
    for key in ("n", "size", "classes"):
        if shape[key] < 1:
            raise LesionbenchError(f"synthetic dataset: {key} must be at least 1, got {shape[key]}")
    if shape["channels"] not in (1, 3):
        raise LesionbenchError(f"synthetic dataset: channels must be 1 or 3, got {shape['channels']}")
    return shape


def synthetic_image(i: int, size: int, classes: int, channels: int = 3, seed: int = 0) -> Image.Image:
    """Image ``i`` of the synthetic dataset: a PIL image (mode RGB or L) of ``size``×``size`` pixels."""
    rng = np.random.default_rng([seed, i])
    tint = np.random.default_rng([seed, 1 << 20, i % classes]).integers(0, 128, channels)
    pixels = rng.integers(0, 128, (size, size, channels), dtype=np.uint8) + tint.astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode="L" if channels == 1 else "RGB")


class SyntheticImages:
    name = "synthetic"
    description = "Deterministic synthetic images, no files: --data n=50000,size=224,classes=1000,channels=3,seed=0."
    default_path = None

    def load(self, path: str | None, split: str = "test") -> RawDataset:
        shape = parse_shape(path)
        n, size, classes, channels, seed = (shape[k] for k in ("n", "size", "classes", "channels", "seed"))
        return RawDataset(
            name=self.name,
            path=",".join(f"{k}={v}" for k, v in shape.items()),
            labels=np.arange(n, dtype=np.int64) % classes,
            num_classes=classes,
            decode=lambda i: synthetic_image(i, size, classes, channels, seed),
            class_names=[f"class {c}" for c in range(classes)],
        )


@hookimpl
def lesionbench_datasets():
    return [SyntheticImages()]
