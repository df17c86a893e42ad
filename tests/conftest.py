"""Shared test helpers: small data sets the tests make themselves (no download, no shared/ files)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from lesionbench.cli import NOT_SCORED_EXIT


def write_fashion(root: Path, n: int = 60, labels: np.ndarray | None = None) -> Path:
    """The two IDX files the ``test`` split reads: random pixels, classes 0..9 in turn."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    if labels is None:
        labels = np.arange(n) % 10
    labels = np.asarray(labels, dtype=np.uint8)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">iii", n, 28, 28) + images.tobytes())
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">i", n) + labels.tobytes())
    return root


# The exit statuses of a run that finished: 0, or 3 when its model's clean accuracy is at chance and
# it is not scored (the suite's random images and untrained nets often are).
FINISHED = (0, NOT_SCORED_EXIT)
