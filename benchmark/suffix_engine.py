"""The fast engine: each cell runs only the part of the network its layer changes.

:class:`SuffixEngine` caches, once per layer, the clean values that cross from the layer's prefix
into its suffix (:mod:`lesionbench.graph` finds the cut), steps that cache from layer to layer,
shards the images when it exceeds the memory budget and spills it to disk
(:class:`lesionbench.spill.SpilledBatches`) when it must; a model or layer without a clean cut gets
the full passes of :class:`lesionbench.naive_engine.NaiveEngine`. The overview is in
:mod:`lesionbench.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import fx

from lesionbench.errors import LesionbenchError
from lesionbench.evaluate import EvalResult, autocast_context, evaluate_batches
from lesionbench.graph import ModelGraph, Split, transition
from lesionbench.layers import Layer
from lesionbench.memory import check_disk
from lesionbench.naive_engine import LayerEval, NaiveEngine
from lesionbench.spill import SpilledBatches

DEFAULT_BUDGET_BYTES = 2 * 1024**3  # the most memory_budget() gives


@dataclass
class _Cache:
    """One layer's cut and the clean boundary values of every batch."""

    layer: str
    split: Split
    values: list | SpilledBatches
    batch_size: int  # the batches the values were cut into (a GPU out of memory may lower it later)
    shard: tuple[int, int]  # the images [start, stop) whose values these are

    def clear(self) -> None:
        self.values.clear()


class SuffixEngine(NaiveEngine):
    """Caches what crosses into a layer's downstream part once per layer; runs only that part per cell.

    The cache outlives the block that filled it: the next block of the same layer (another
    perturbation) reuses it, and the next layer's cache is computed from it by running only the
    segment between the two cuts (:func:`transition`), so a study in forward order pays about one
    forward pass for all its caches. :meth:`close` frees it.
    """

    name = "fast"

    def __init__(
        self,
        graph: ModelGraph,
        images,
        labels,
        batch_size,
        device,
        autocast: bool = False,
        budget_bytes: int | None = None,
        spill: bool = True,
    ):
        super().__init__(graph, images, labels, batch_size, device, autocast)
        if budget_bytes is None:
            from lesionbench.memory import memory_budget

            budget_bytes = memory_budget(torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None)
        self.budget_bytes = budget_bytes
        self.spill = spill
        self._cache: _Cache | None = None
        self._splits: dict[str, Split | None] = {}
        self._per_image: dict[str, int] = {}
        self._shard = (0, len(labels))
        self._image_batch: torch.Tensor | None = None  # the last batch _images made (to spot it among outputs)
        if graph.fx is None:
            self.notes.append(f"{type(self.module).__name__}: {graph.untraceable}: every cell is a full pass")

    def _split(self, layer: Layer) -> Split | None:
        if layer.name not in self._splits:
            self._splits[layer.name] = self.graph.split(layer)
        return self._splits[layer.name]

    def bytes_per_image(self, layer: Layer) -> int:
        """Bytes of cached boundary values per image at ``layer`` (0 when its values are the input
        itself, or when it has no cut), measured by running its prefix on one image."""
        if layer.name not in self._per_image:
            parts = self._split(layer)
            size = 0
            if parts is not None:
                parts.prefix.eval()
                with torch.inference_mode(), autocast_context(self.device, self.autocast):
                    x = self.images[0:1].to(self.device)
                    self._image_batch = x
                    size = _counted_bytes(tuple(parts.prefix(x)), x)
            self._per_image[layer.name] = size
        return self._per_image[layer.name]

    def shards(self, layer: Layer) -> list[tuple[int, int]]:
        """Image ranges [start, stop) whose cached values at ``layer`` each fit the budget: as few as
        possible, each a whole number of batches (the last excepted). One range when all fit."""
        n = len(self.labels)
        if self.graph.fx is None or self._split(layer) is None:
            return [(0, n)]
        per_image = self.bytes_per_image(layer)
        if per_image * n <= self.budget_bytes:
            return [(0, n)]
        size = max(self.batch_size, self.budget_bytes // per_image // self.batch_size * self.batch_size)
        return [(b, min(n, b + size)) for b in range(0, n, size)]

    @contextmanager
    def for_layer(self, layer: Layer, shard: tuple[int, int] | None = None) -> Iterator[LayerEval]:
        """How to evaluate ``layer``'s cells on the images ``shard`` (default: all of them)."""
        shard = shard or (0, len(self.labels))
        cache = self._cache_for(layer, shard)
        if cache is None:
            with super().for_layer(layer, shard) as run_eval:
                yield run_eval
            return
        parts, cached = cache.split, cache.values
        suffix = parts.suffix
        start, stop = shard
        labels = [self.labels[b : min(b + self.batch_size, stop)] for b in range(start, stop, self.batch_size)]
        suffix.eval()
        if parts.mutates_boundary:  # an in-place op would corrupt the cache for the next cell
            forward = lambda i: suffix(*(v.clone() for v in self._read(cached, i)))  # noqa: E731
        else:
            forward = lambda i: suffix(*self._read(cached, i))  # noqa: E731

        def many(variants: list[dict[str, torch.Tensor]]) -> list[EvalResult]:
            stacked = {k: torch.stack([v[k] for v in variants]).to(self.device) for k in variants[0]}
            batched = torch.func.vmap(
                lambda params, *xs: torch.func.functional_call(suffix, params, xs),
                in_dims=(0,) + (None,) * parts.n_boundary,
            )
            return evaluate_batches(
                lambda i: batched(stacked, *self._read(cached, i)),
                labels,
                self.device,
                self.autocast,
                variants=len(variants),
            )

        yield LayerEval(
            lambda: evaluate_batches(forward, labels, self.device, self.autocast),
            None if parts.mutates_boundary else many,
            self.batch_size,
        )

    def close(self) -> None:
        """Free the cached activations (and delete spilled files)."""
        if self._cache is not None:
            self._cache.clear()
            self._cache = None

    def _cache_for(self, layer: Layer, shard: tuple[int, int]) -> _Cache | None:
        """The layer's cut and cached values for the images ``shard``: kept from the last block,
        stepped from the previous layer's cache of the same images, or computed by the prefix;
        None (with a note) when the layer gets full passes."""
        if self._cache is not None and self._cache.batch_size != self.batch_size:
            self.close()
        if self._cache is not None and self._cache.layer == layer.name and self._cache.shard == shard:
            return self._cache
        previous, self._cache = self._cache, None
        if previous is not None and previous.shard != shard:
            previous.clear()
            previous = None
        self._shard = shard
        try:
            parts = self._split(layer)
            if parts is None:
                if self.graph.fx is not None:
                    self.notes.append(
                        f"{layer.name}: no clean cut (not a graph node, or its tensors are read upstream): full passes"
                    )
                return None
            step = transition(self.graph.fx, previous.split.boundary, parts.boundary) if previous is not None else None
            if step is not None:
                values = self._boundary_values(
                    step, layer.name, lambda i: self._read(previous.values, i), consume=previous.values
                )
            else:
                if previous is not None:  # free it first: never two caches' worth of memory at once
                    previous.clear()
                values = self._boundary_values(parts.prefix, layer.name, self._images)
        finally:  # the previous layer's cache goes however this ends
            if previous is not None:
                previous.clear()
        if values is None:
            self.notes.append(
                f"{layer.name}: cached activations exceed {self.budget_bytes} bytes and cannot be spilled: full passes"
            )
            return None
        self._cache = _Cache(layer.name, parts, values, self.batch_size, shard)
        return self._cache

    def _images(self, i: int) -> tuple[torch.Tensor]:
        """Batch ``i`` of the current shard, on the device."""
        b = self._shard[0] + i * self.batch_size
        self._image_batch = self.images[b : min(b + self.batch_size, self._shard[1])].to(self.device, non_blocking=True)
        return (self._image_batch,)

    def _read(self, values, i: int) -> tuple:
        """Cached batch ``i`` with the stored images put back where the cache kept only a marker."""
        batch = values[i]
        if any(v is _INPUT for v in batch):
            image = self._images(i)[0]
            return tuple(image if v is _INPUT else v for v in batch)
        return batch

    def _boundary_values(
        self, step: fx.GraphModule, layer_name: str, inputs: Callable[[int], tuple], consume: list | None = None
    ) -> list[tuple[torch.Tensor, ...]] | SpilledBatches | None:
        """``step``'s outputs for every batch of ``inputs``: on the device within the budget, past it
        spilled to memory-mapped files (read back page by page); None when spilling is off or the disk
        is full. Batches of a ``consume`` list are dropped as soon as they are used."""
        out: list[tuple[torch.Tensor, ...]] | SpilledBatches = []
        used = 0
        step.eval()
        try:
            with torch.inference_mode(), autocast_context(self.device, self.autocast):
                start, stop = self._shard
                for i in range(math.ceil((stop - start) / self.batch_size)):
                    self._image_batch = None
                    values = tuple(step(*inputs(i)))
                    if isinstance(consume, list):
                        consume[i] = None
                    values = tuple(_INPUT if _is_input(v, self._image_batch) else v for v in values)
                    used += _counted_bytes(values)
                    if used > self.budget_bytes and isinstance(out, list):
                        if not self.spill:
                            return None
                        need = used * math.ceil((stop - start) / self.batch_size) // (i + 1)  # at this rate
                        try:
                            check_disk(need, f"{layer_name}: spilling its cached activations")
                        except LesionbenchError as exc:  # known before writing anything: full passes
                            self.notes.append(f"{exc}: full passes")
                            return None
                        spilled = SpilledBatches(self.device)
                        try:
                            for earlier in out:
                                spilled.append(earlier)
                        except OSError:
                            spilled.clear()
                            return None
                        out = spilled
                        self.notes.append(
                            f"{layer_name}: cached activations exceed {self.budget_bytes} bytes: spilled to {spilled.dir}"
                        )
                    try:
                        out.append(values)
                    except OSError:  # disk full: give up on caching this layer
                        out.clear()
                        return None
        except BaseException:  # an error or Ctrl-C midway: no half-filled cache, no files left behind
            out.clear()
            raise
        return out


_INPUT = object()  # stands for the batch of images itself: read again from the evaluation set, not cached


def _is_input(value, image: torch.Tensor | None) -> bool:
    """Whether ``value`` is the image batch (the same memory, shape and strides): nothing to cache."""
    return (
        image is not None
        and isinstance(value, torch.Tensor)
        and value.data_ptr() == image.data_ptr()
        and value.shape == image.shape
        and value.stride() == image.stride()
        and value.dtype == image.dtype
    )


def _counted_bytes(values: tuple, image: torch.Tensor | None = None) -> int:
    """Bytes a cache of ``values`` holds: tensors, less those that are the image batch itself."""
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor) and not _is_input(v, image))
