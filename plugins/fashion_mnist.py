"""Fashion-MNIST from its original IDX files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from lesionbench.data import RawDataset
from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array of its declared shape.

    Not torchvision's reader (``torchvision.datasets.mnist.read_sn3_pascalvincent_tensor``): it
    reads only uncompressed files (Debian ships the .gz files) and reports a malformed or cut-off
    file by a bare ``assert``; this names the file and what is wrong with it in one line.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # a cut-off or corrupt .gz
        raise LesionbenchError(f"{path} is unreadable or truncated: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise LesionbenchError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise LesionbenchError(f"{path} is truncated: its header is cut off")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise LesionbenchError(f"{path} is truncated: expected {int(np.prod(dims))} bytes, found {body.size}")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise LesionbenchError(f"Fashion-MNIST file {stem}[.gz] not found in {root}")


class FashionMNIST:
    name = "fashion_mnist"
    description = "Fashion-MNIST, 28×28 grey, 10 classes, from IDX files (apt-get install dataset-fashion-mnist)."
    default_path = DEFAULT_PATH

    def class_names_for(self, num_classes: int) -> list[str] | None:
        """The ten class names (None for results with another number of classes)."""
        return list(CLASSES) if num_classes == len(CLASSES) else None

    def load(self, path: str | None, split: str = "test") -> RawDataset:
        root = Path(path or DEFAULT_PATH)
        if not root.is_dir():
            raise LesionbenchError(
                f"Fashion-MNIST not found at {str(root)!r}: install it with "
                "`apt-get install -y dataset-fashion-mnist` or pass --data PATH"
            )
        if split not in FILES:
            raise LesionbenchError(f"unknown split {split!r} for fashion_mnist; valid: {', '.join(FILES)}")
        prefix = FILES[split]
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(images) != len(labels):
            raise LesionbenchError(f"Fashion-MNIST at {root}: {len(images)} images but {len(labels)} labels")
        return RawDataset(
            name=self.name,
            path=str(root),
            labels=labels,
            num_classes=len(CLASSES),
            decode=lambda i: Image.fromarray(images[i], mode="L"),
            class_names=list(CLASSES),
        )


@hookimpl
def lesionbench_datasets():
    return [FashionMNIST()]
