"""A compact evaluation set: uint8 images after resize and crop, normalised one batch at a time.

A float32 224-px image takes 602 KB; the same image as uint8 takes 150 KB, and normalising a
batch when it is read costs far less than the network's pass over it. The floats are the same,
bit for bit: :func:`split_normalisation` cuts a torchvision/timm preprocessing pipeline just
before its ``ToTensor`` and ``Normalize`` and :class:`Pixels` applies those two steps to each
batch with the very operations they use (``to(float).div(255)``, then the ``sub_``/``div_`` of
``torchvision.transforms.functional.normalize``), which are element-wise. A model whose
preprocessing is only "PIL steps, to tensor, normalise" can say so with :class:`ToNormalisedTensor`
and never import torchvision (1.4 CPU s, most of it ``torch._dynamo``, which ``torchvision.ops``
imports). Sets larger than the
memory budget live in a file (:class:`DiskStore`) read batch by batch with ordinary reads, so
they take no resident memory beyond the batch being read.
"""

from __future__ import annotations

import os
import sys
import tempfile
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lesionbench.memory import check_disk, scratch_dir

COMPACT_MODES = ("L", "RGB", "RGBA")  # PIL modes whose ToTensor is uint8 ÷ 255


class NotCompact(Exception):
    """An image that the uint8 path cannot represent exactly (another PIL mode, not a PIL image)."""


def _pil_to_uint8(img) -> torch.Tensor:
    """A PIL image of a mode in ``COMPACT_MODES`` → uint8 [C, H, W], as
    ``torchvision.transforms.functional.pil_to_tensor`` makes it; :class:`NotCompact` otherwise."""
    from PIL import Image

    if not isinstance(img, Image.Image) or img.mode not in COMPACT_MODES:
        raise NotCompact(getattr(img, "mode", type(img).__name__))
    array = np.array(img, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).view(img.size[1], img.size[0], -1).permute(2, 0, 1).contiguous()


class ToNormalisedTensor:
    """Preprocessing "``steps`` on a PIL image, then ``ToTensor``, then ``Normalize(mean, std)``"
    that gives torchvision's floats bit for bit without importing torchvision.

    ``steps``: PIL image → PIL image callables (e.g. ``lambda im: im.convert("L")`` for
    ``Grayscale(1)``). Called on a PIL image it returns float [C, H, W] (the default dtype);
    :func:`split_normalisation` recognises it, so evaluation sets keep its images as uint8.
    Anything else (a tensor, or a PIL mode outside ``COMPACT_MODES`` after the steps) goes to
    ``fallback()``, the equivalent torchvision pipeline, built on first use; without one it raises
    :class:`NotCompact`.
    """

    def __init__(
        self, steps: Sequence[Callable], mean, std, fallback: Callable[[], Callable[[Any], torch.Tensor]] | None = None
    ) -> None:
        self.steps, self.mean, self.std = tuple(steps), tuple(mean), tuple(std)
        self._fallback, self._built = fallback, None

    def to_uint8(self, img) -> torch.Tensor:
        """The image after ``steps``, as uint8 [C, H, W]; :class:`NotCompact` where that is not exact."""
        from PIL import Image

        if not isinstance(img, Image.Image):
            raise NotCompact(type(img).__name__)
        for step in self.steps:
            img = step(img)
        return _pil_to_uint8(img)

    def __call__(self, img) -> torch.Tensor:
        try:
            return normalise(self.to_uint8(img), self.mean, self.std)
        except NotCompact:
            if self._fallback is None:
                raise
            if self._built is None:
                self._built = self._fallback()
            return self._built(img)

    def __repr__(self) -> str:
        return f"ToNormalisedTensor(steps={len(self.steps)}, mean={self.mean}, std={self.std})"


def _flatten(transform) -> list | None:
    from torchvision import transforms

    if isinstance(transform, transforms.Compose):
        steps = []
        for t in transform.transforms:
            inner = _flatten(t)
            if inner is None:
                return None
            steps.extend(inner)
        return steps
    return [transform]


def split_normalisation(transform: Callable) -> tuple[Callable[[Any], torch.Tensor], Any, Any] | None:
    """``(to_uint8, mean, std)`` with ``normalise(to_uint8(img), mean, std) == transform(img)`` bit
    for bit, or None when ``transform`` is not such a pipeline.

    Recognised: a (nested) ``torchvision.transforms.Compose`` whose last two steps are ``ToTensor``
    (or a subclass such as timm's ``MaybeToTensor``) and ``Normalize``, and torchvision's weights
    preset ``ImageClassification`` (resize, centre crop, to tensor, normalise) as its last step.
    ``to_uint8`` raises :class:`NotCompact` for an image that is not a PIL image of a mode in
    ``COMPACT_MODES`` once the earlier steps have run. A :class:`ToNormalisedTensor` is split into its
    own steps; torchvision is consulted only when it is already imported (a torchvision transform
    cannot exist before), so recognising one costs no import.
    """
    if isinstance(transform, ToNormalisedTensor):
        return transform.to_uint8, transform.mean, transform.std
    if "torchvision" not in sys.modules:
        return None
    from torchvision import transforms
    from torchvision.transforms import functional as F
    from torchvision.transforms._presets import ImageClassification

    steps = _flatten(transform)
    if not steps:
        return None
    last = steps[-1]
    if isinstance(last, ImageClassification):
        front = steps[:-1] + [
            lambda img: F.center_crop(
                F.resize(img, last.resize_size, interpolation=last.interpolation, antialias=last.antialias),
                last.crop_size,
            )
        ]
        mean, std = last.mean, last.std
    elif len(steps) >= 2 and isinstance(last, transforms.Normalize) and isinstance(steps[-2], transforms.ToTensor):
        front, mean, std = steps[:-2], last.mean, last.std
    else:
        return None

    def to_uint8(img) -> torch.Tensor:
        for step in front:
            img = step(img)
        return _pil_to_uint8(img)

    return to_uint8, mean, std


def normalise(batch: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [..., C, H, W] → float (the default dtype): ``ToTensor``'s ÷255 then ``Normalize``, with
    the operations of ``torchvision.transforms.functional.normalize`` (``sub_(mean)``, ``div_(std)``,
    mean and std as [C, 1, 1] tensors of the batch's dtype), so the floats are the same bit for bit.
    Raises ValueError for a zero in ``std``, as torchvision does."""
    x = batch.to(torch.get_default_dtype()).div(255)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if (std == 0).any():
        raise ValueError(f"std evaluated to zero after conversion to {x.dtype}, leading to division by zero.")
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    return x.sub_(mean).div_(std)


class DiskStore:
    """A fixed-shape array [N, ...] in a temporary file, written and read with ordinary file I/O.

    Not memory-mapped: pages it reads stay in the page cache, not in the process's resident set.
    ``store[k] = tensor`` writes row k; ``store[a:b]`` and ``store[i]`` read rows back as tensors;
    ``store.head(k)`` is a store of the first k rows over the same file. The file goes when the last store over
    it does (or at :meth:`close`). Its size is checked against the free disk first
    (LesionbenchError).
    """

    def __init__(self, n: int, row_shape: tuple[int, ...], dtype: torch.dtype, what: str = "images") -> None:
        self.dtype = dtype
        self.row_shape = tuple(row_shape)
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self.row_bytes = int(np.prod(self.row_shape)) * self._np_dtype.itemsize
        check_disk(n * self.row_bytes, f"the evaluation set of {n} {what}")
        fd, self.path = tempfile.mkstemp(prefix="lesionbench-images-", dir=scratch_dir())
        self._file = os.fdopen(fd, "r+b")
        self._file.truncate(n * self.row_bytes)
        self._finalizer = weakref.finalize(self, DiskStore._remove, self._file, self.path)
        self.n = n

    @staticmethod
    def _remove(file, path: str) -> None:
        file.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._finalizer()

    def head(self, k: int) -> DiskStore:
        """The first ``k`` rows: a store over the same file."""
        view = object.__new__(DiskStore)
        view.__dict__.update(self.__dict__)
        view.n = min(k, self.n)
        return view

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.row_shape)

    def __len__(self) -> int:
        return self.n

    def __setitem__(self, k: int, row: torch.Tensor) -> None:
        data = row.contiguous().numpy().tobytes()
        os.pwrite(self._file.fileno(), data, k * self.row_bytes)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        count = max(0, stop - start)
        data = os.pread(self._file.fileno(), count * self.row_bytes, start * self.row_bytes)
        array = np.frombuffer(bytearray(data), dtype=self._np_dtype).reshape(count, *self.row_shape)
        return torch.from_numpy(array)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n)
            return self._read(start, stop)[::step] if step != 1 else self._read(start, stop)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (self.n if index < 0 else 0)
            if not 0 <= i < self.n:
                raise IndexError(f"row {index} of {self.n}")
            return self._read(i, i + 1)[0]
        rows = torch.as_tensor(index).reshape(-1).tolist()
        return torch.stack([self[int(i)] for i in rows]) if rows else self._read(0, 0)


def new_store(n: int, first: torch.Tensor, memory_bytes: int | None, what: str = "images"):
    """Room for ``n`` rows like ``first``: a tensor, or a :class:`DiskStore` past ``memory_bytes``."""
    if memory_bytes is not None and n * first.numel() * first.element_size() > memory_bytes:
        return DiskStore(n, tuple(first.shape), first.dtype, f"{what} images")
    return torch.empty((n, *first.shape), dtype=first.dtype)


class Pixels:
    """uint8 images [N, C, H, W] that read as the normalised float tensor the preprocessing made.

    Indexing (``pixels[a:b]``, ``pixels[i]``, ``pixels[idx]``, ``pixels[i, c]``) returns a new
    float tensor of :attr:`dtype` (channels_last after ``contiguous(memory_format=torch.channels_last)``);
    ``to(dtype)`` and ``contiguous(...)`` return another view of the same store. The store is a
    tensor in memory or a :class:`DiskStore`.
    """

    def __init__(self, store, mean, std, dtype: torch.dtype | None = None, channels_last: bool = False) -> None:
        self.store, self.mean, self.std = store, mean, std
        self.dtype = dtype or torch.get_default_dtype()
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.store)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.store.shape)

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the uint8 images take (in memory or on disk)."""
        return int(np.prod(self.shape))

    @property
    def on_disk(self) -> bool:
        return isinstance(self.store, DiskStore)

    def _like(self, **changes) -> Pixels:
        args = {"dtype": self.dtype, "channels_last": self.channels_last} | changes
        return Pixels(self.store, self.mean, self.std, **args)

    def to(self, dtype: torch.dtype) -> Pixels:
        return self._like(dtype=dtype)

    def contiguous(self, memory_format: torch.memory_format = torch.contiguous_format) -> Pixels:
        return self._like(channels_last=memory_format is torch.channels_last)

    def pin_memory(self) -> Pixels:
        """Batches are made when read; there is nothing to pin ahead."""
        return self

    def __getitem__(self, index) -> torch.Tensor:
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        x = normalise(self.store[index], self.mean, self.std)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x[(slice(None), *rest)] if rest and x.dim() == len(self.shape) else (x[rest] if rest else x)
