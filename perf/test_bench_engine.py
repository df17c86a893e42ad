"""pytest-benchmark timings of one layer × perturbation block: fast engine vs naive loop.

Run with ``python -m pytest perf/ --benchmark-only`` (not part of ``make test``); compare
the rows of the table it prints. Each round starts a new engine, so the fast engine's time
includes filling the layer's cache (which a study pays once per layer, for all its blocks). ``perf/engine_ratios.py`` gives whole-study ratios.
"""

from __future__ import annotations

import pytest
import torch

from lesionbench.engine import NaiveEngine, SuffixEngine
from lesionbench.graph import ModelGraph, discover_layers
from lesionbench.models.fashion import FashionAlexNet
from lesionbench.perturbation import generator_for, perturbed
from lesionbench.registry import create_registry

LEVELS = (0.25, 0.5, 0.75, 1.0)
DRAWS = 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = FashionAlexNet().eval()
    images, labels = torch.randn(512, 1, 28, 28), torch.arange(512) % 10
    layers = {l.display: l for l in discover_layers(model, images[:1])}
    perturbation = create_registry().get("perturbations", "synapse_knockout")
    return model, images, labels, layers, perturbation


def block(engine, layer, perturbation):
    """All levels × draws of one layer, as a study evaluates them."""
    with engine.for_layer(layer) as run:
        for level in LEVELS:
            for draw in range(DRAWS):
                with perturbed(layer, perturbation, level, generator_for(draw)):
                    run()


def block_batched(engine, layer, perturbation):
    """The same cells, their damaged weights evaluated together in one vmapped pass per level."""
    with engine.for_layer(layer) as run:
        for level in LEVELS:
            variants = []
            for draw in range(DRAWS):
                with perturbed(layer, perturbation, level, generator_for(draw)):
                    variants.append({f"{layer.name}.{k}": t.clone() for k, t in layer.module.named_parameters()})
            run.many(variants)


@pytest.mark.parametrize("layer", ["conv1", "conv4", "fc7"])
@pytest.mark.parametrize("engine_cls", [NaiveEngine, SuffixEngine, "batched"], ids=["naive", "fast", "fast-batched"])
def test_block(benchmark, setup, engine_cls, layer):
    model, images, labels, layers, perturbation = setup
    benchmark.group = f"synapse_knockout on {layer}"
    run = block_batched if engine_cls == "batched" else block

    def fresh():  # a new engine each round: the fast engine fills its cache in every timed round
        graph = ModelGraph.of(model, images[:1])
        engine = (SuffixEngine if engine_cls == "batched" else engine_cls)(
            graph, images, labels, 256, torch.device("cpu")
        )
        return (engine, layers[layer], perturbation), {}

    benchmark.pedantic(run, setup=fresh, rounds=3, iterations=1)
