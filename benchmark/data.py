"""Datasets as plugins, the seeded class-stratified evaluation subset, and decode-once tensors.

A dataset source only knows how to list labels and decode image i; which images form the
evaluation set (identical for every model of a study) and how they are preprocessed (each
model's own way) is decided here, once, and cached by the preprocessing key.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from lesionbench.errors import LesionbenchError

if TYPE_CHECKING:
    from lesionbench.pixels import Pixels


@dataclass
class RawDataset:
    """Labels plus a decoder; nothing is decoded until the harness asks."""

    name: str
    path: str
    labels: np.ndarray  # int64, one per image
    num_classes: int
    decode: Callable[[int], Any]  # index -> PIL image
    class_names: list[str] = field(default_factory=list)
    # A text dataset: decode(i) gives a TextWindow of this many next-token predictions (None: images)
    tokens: int | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TextWindow:
    """An item of a text dataset: a stretch of ``text`` from which a language model's preprocessing
    keeps the first ``tokens`` + 1 tokens of its own tokenizer (``tokens`` next-token predictions)."""

    text: str
    tokens: int


@runtime_checkable
class DatasetSource(Protocol):
    """What a dataset plugin contributes: ``load(path, split)`` → :class:`RawDataset`.

    ``name`` is what a study's ``[dataset] name`` takes, ``default_path`` where it looks when the
    study gives no path (None: a path is required). ``load`` raises LesionbenchError for a missing
    or unreadable path, naming it.
    """

    name: str
    description: str
    default_path: str | None

    def load(self, path: str | None, split: str) -> RawDataset:
        """Open the dataset at ``path`` (or the default) and return its labels and decoder."""

    # Optional: ``class_names_for(num_classes: int) -> Sequence[str] | None``, the readable name
    # of every label when results with ``num_classes`` classes came from this dataset (None when
    # unknown). The leaderboard's class-damage lines use it without opening the data; without it
    # classes are named ``class <label>``.


@dataclass
class EvalSet:
    """Preprocessed images and labels, ready for every cell of a study.

    ``images`` is a float tensor [N, C, H, W], or — for the usual "resize, crop, to tensor,
    normalise" preprocessing — :class:`Pixels`: the uint8 images after resize and crop,
    normalised batch by batch when read (a quarter of the memory, and the same floats).
    """

    images: torch.Tensor | Pixels
    labels: torch.Tensor
    indices: np.ndarray  # positions in the raw dataset
    skipped: int = 0  # unreadable files left out

    def __len__(self) -> int:
        return len(self.labels)


def stratified_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """``n`` indices balanced over classes, chosen by ``seed``; the same for the same inputs.

    Each class's images are shuffled, then classes are taken in turn (round robin), so any N has as
    equal a class balance as the data allows. When N is smaller than the number of classes (500 of
    the ImageNet sample's 1,000 classes, one image each) not every class can be in the subset, and
    which classes are is a seeded random draw rather than the first ones in label order. Returned
    sorted, for sequential reads.
    """
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n <= 0:
        raise LesionbenchError(f"n_images must be positive, got {n}")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    if n < len(per_class):  # drawn after the per-class shuffles: larger subsets are the ones earlier releases chose
        per_class = [per_class[i] for i in rng.permutation(len(per_class))[:n]]
    order = []
    depth = 0
    while len(order) < n:
        for members in per_class:
            if depth < len(members):
                order.append(members[depth])
        depth += 1
    return np.sort(np.asarray(order[:n], dtype=np.int64))


def build_eval_set(
    raw: RawDataset, indices: np.ndarray, preprocess: Callable[[Any], torch.Tensor], memory_bytes: int | None = None
) -> EvalSet:
    """Decode and preprocess the chosen images once; unreadable files are skipped and counted.

    Where ``preprocess`` ends in "to tensor, normalise" (see :func:`lesionbench.pixels.split_normalisation`)
    the images are kept as uint8 (:class:`Pixels`), in memory up to ``memory_bytes`` (default
    :func:`lesionbench.memory.memory_budget`) and past it in a file on disk (its size checked
    against the free space first: LesionbenchError if it cannot fit). Either way they are written
    into one tensor allocated up front: no list of images stacked at the end.
    """
    from lesionbench.memory import memory_budget
    from lesionbench.pixels import NotCompact, Pixels, split_normalisation

    split = split_normalisation(preprocess)
    if split is not None:
        try:
            return _fill(
                raw,
                indices,
                split[0],
                memory_budget() if memory_bytes is None else memory_bytes,
                lambda store: Pixels(store, split[1], split[2]),
            )
        except NotCompact:  # an image that is not 8-bit after resize and crop: float32 for the whole set
            pass
    return _fill(raw, indices, preprocess, None, lambda store: store)


def _fill(raw: RawDataset, indices: np.ndarray, preprocess, memory_bytes: int | None, wrap) -> EvalSet:
    """Decode ``indices`` through ``preprocess`` into one store sized on the first image."""
    from lesionbench.pixels import new_store

    store, kept = None, []
    skipped = 0
    try:
        for i in indices:
            try:
                img = raw.decode(int(i))
            except (OSError, ValueError, SyntaxError) as exc:
                skipped += 1
                warnings.warn(f"skipping unreadable image {i} of {raw.name}: {exc}", stacklevel=3)
                continue
            x = preprocess(img)
            if store is None:
                store = new_store(len(indices), x, memory_bytes, raw.name)
            store[len(kept)] = x
            kept.append(int(i))
    except BaseException:
        if store is not None and hasattr(store, "close"):
            store.close()
        raise
    if not kept:
        raise LesionbenchError(f"dataset {raw.name!r} at {raw.path!r} yielded no readable images")
    kept_arr = np.asarray(kept, dtype=np.int64)
    return EvalSet(
        images=wrap(
            store
            if len(kept) == len(indices)
            else store.head(len(kept))
            if hasattr(store, "head")
            else store[: len(kept)]
        ),
        labels=torch.as_tensor(raw.labels[kept_arr], dtype=torch.long),
        indices=kept_arr,
        skipped=skipped,
    )


class EvalSetCache:
    """Decoded evaluation sets keyed by (dataset, subset, preprocessing): decode once per study."""

    def __init__(self) -> None:
        self._sets: dict[tuple, EvalSet] = {}

    def get(self, raw: RawDataset, indices: np.ndarray, preprocess, preprocess_key: str) -> EvalSet:
        key = (raw.name, raw.path, indices.tobytes(), preprocess_key)
        if key not in self._sets:
            self._sets[key] = build_eval_set(raw, indices, preprocess)
        return self._sets[key]
