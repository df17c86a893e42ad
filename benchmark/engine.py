"""How cells are evaluated: the naive full pass, or only the part of the network a layer changes.

When layer L is perturbed, every value in the network that does not depend on L is the same as in
the clean pass. :class:`SuffixEngine` asks the model's graph (:mod:`lesionbench.graph`, traced
once) to split it at each layer into a *prefix* (everything that does not depend on L) and a
*suffix* (L and everything downstream of it). The values that cross from prefix to suffix — L's input, but also
skip connections around L in a ResNet or EfficientNet — are computed once per layer and kept;
each cell then runs only the suffix. Models that cannot be traced fall back to full passes (logged).

The cached values of a layer are bounded by a memory budget (:func:`lesionbench.memory.memory_budget`):
:meth:`SuffixEngine.shards` cuts the evaluation set into shards whose cache fits it (whole batches,
so every batch holds the images it holds unsharded), and the caller evaluates a layer's cells shard
by shard. Values that are the model's input itself (the first layer's "cache") are neither counted
nor stored: they are read again from the evaluation set.

:class:`NaiveEngine` is the reference: one full forward pass per cell (``--engine naive``).

This module is the door (:func:`create_engine`); the engines are in :mod:`lesionbench.naive_engine`
(with :class:`LayerEval`, what an engine gives the cells of a layer) and
:mod:`lesionbench.suffix_engine`, the files a cache spills to in :mod:`lesionbench.spill`. Their
names stay importable from here.
"""

from __future__ import annotations

from lesionbench.graph import ModelGraph
from lesionbench.naive_engine import MAX_IMAGES_PER_PASS as MAX_IMAGES_PER_PASS
from lesionbench.naive_engine import VARIANT_BUDGET_BYTES as VARIANT_BUDGET_BYTES
from lesionbench.naive_engine import LayerEval as LayerEval
from lesionbench.naive_engine import NaiveEngine
from lesionbench.spill import SpilledBatches as SpilledBatches
from lesionbench.suffix_engine import _INPUT as _INPUT
from lesionbench.suffix_engine import DEFAULT_BUDGET_BYTES as DEFAULT_BUDGET_BYTES
from lesionbench.suffix_engine import SuffixEngine

ENGINES = ("fast", "naive")


def create_engine(
    name: str,
    graph: ModelGraph,
    images,
    labels,
    batch_size,
    device,
    autocast: bool = False,
    budget_bytes: int | None = None,
):
    """The single door to an engine by name."""
    if name == "naive":
        return NaiveEngine(graph, images, labels, batch_size, device, autocast)
    if name == "fast":
        return SuffixEngine(graph, images, labels, batch_size, device, autocast, budget_bytes)
    from lesionbench.errors import unknown_name

    raise unknown_name("engine", name, ENGINES)
