"""Cached boundary values kept on disk: memory-mapped files, one per batch.

The fast engine (:mod:`lesionbench.suffix_engine`) spills a layer's cache here when it exceeds the
memory budget (:func:`lesionbench.memory.memory_budget`) and the disk has room for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

_SAVED = object()  # stands for a tensor that is in the batch's file


class SpilledBatches:
    """Cached boundary values kept in memory-mapped files instead of memory, one file per batch.

    Each batch's tensors are written with ``torch.save`` and read back with
    ``torch.load(mmap=True)``, so only the pages a suffix pass touches are read, in their own
    dtype and memory layout (channels_last stays channels_last). :meth:`clear` deletes the files.
    The folder (``tempfile.mkdtemp``) is under ``$LESIONBENCH_SPILL_DIR`` or the system's
    temporary directory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.dir = Path(tempfile.mkdtemp(prefix="lesionbench-spill-", dir=os.environ.get("LESIONBENCH_SPILL_DIR")))
        self._batches: list[tuple[Path, list]] = []  # (file, values with _SAVED where a tensor was saved)
        # the files go with this object even if nobody calls clear() (an error, a worker let go)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    def append(self, values: tuple) -> None:
        path = self.dir / f"{len(self._batches)}.pt"
        torch.save([v.detach().cpu() for v in values if isinstance(v, torch.Tensor)], path)
        self._batches.append((path, [_SAVED if isinstance(v, torch.Tensor) else v for v in values]))

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: int) -> tuple:
        path, others = self._batches[i]
        tensors = iter(torch.load(path, mmap=True, weights_only=True))
        return tuple(next(tensors).to(self.device, non_blocking=True) if v is _SAVED else v for v in others)

    def clear(self) -> None:
        self._batches.clear()
        self._finalizer()  # deletes the folder, once
