"""What an engine gives the cells of a layer (:class:`LayerEval`), and the reference engine.

:class:`NaiveEngine` evaluates each cell by one full forward pass over the evaluation set
(``--engine naive``): the reference the fast engine (:mod:`lesionbench.suffix_engine`), which
subclasses it, must agree with. Both are created through :func:`lesionbench.engine.create_engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lesionbench.evaluate import EvalResult, evaluate
from lesionbench.graph import ModelGraph
from lesionbench.layers import Layer

VARIANT_BUDGET_BYTES = 1024**3  # stacked perturbed copies of one layer, per pass
MAX_IMAGES_PER_PASS = 4096  # variants × batch size: bounds the activations of a batched pass


@dataclass
class LayerEval:
    """How the cells of one layer are evaluated: one at a time, or several in one pass.

    ``many`` (fast engine only) takes several perturbed copies of the layer's tensors, keyed by
    their names in the model, and evaluates them together with ``torch.func.vmap`` over
    ``functional_call``: one pass for all the draws instead of one each.
    """

    one: Callable[[], EvalResult]
    many: Callable[[list[dict[str, torch.Tensor]]], list[EvalResult]] | None = None
    batch_size: int = 1

    def __call__(self) -> EvalResult:
        return self.one()

    def capacity(self, bytes_per_variant: int) -> int:
        """How many copies of a layer one batched pass may take, within both memory bounds."""
        if self.many is None:
            return 1
        return max(1, min(MAX_IMAGES_PER_PASS // self.batch_size, VARIANT_BUDGET_BYTES // max(1, bytes_per_variant)))


class NaiveEngine:
    """One full pass over the evaluation set per cell."""

    name = "naive"

    def __init__(
        self,
        graph: ModelGraph,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device,
        autocast: bool = False,
    ):
        self.graph, self.module, self.images, self.labels = graph, graph.module, images, labels
        self.batch_size, self.device, self.autocast = batch_size, device, autocast
        self.notes: list[str] = []

    def shards(self, layer: Layer) -> list[tuple[int, int]]:
        """The image ranges [start, stop) a layer's cells are evaluated on, in order: all at once."""
        return [(0, len(self.labels))]

    def full(self) -> EvalResult:
        """A full pass; on a GPU out of memory, the batch size is halved until it fits (and kept)."""
        while True:
            try:
                return evaluate(self.module, self.images, self.labels, self.batch_size, self.device, self.autocast)
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size //= 2
                self.notes.append(f"out of GPU memory: batch size lowered to {self.batch_size}")

    @contextmanager
    def for_layer(self, layer: Layer, shard: tuple[int, int] | None = None) -> Iterator[LayerEval]:
        if shard is None or shard == (0, len(self.labels)):
            yield LayerEval(self.full)
            return
        start, stop = shard
        yield LayerEval(
            lambda: evaluate(
                self.module,
                _Range(self.images, start),
                self.labels[start:stop],
                self.batch_size,
                self.device,
                self.autocast,
            )
        )

    def close(self) -> None:
        """Nothing is cached."""


class _Range:
    """The images from ``start`` on, indexed like a tensor (a shard of a naive pass)."""

    def __init__(self, images, start: int) -> None:
        self.images, self.start = images, start

    def __getitem__(self, s: slice):
        return self.images[self.start + s.start : self.start + s.stop]
