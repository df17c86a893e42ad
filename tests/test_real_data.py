"""Checks on real data a clone does not make: each skips, with the reason, where its data is absent, and fails
where env CI is set (conftest's ``golden`` mark)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import IMAGENET_SAMPLE, needs_fashion_mnist, needs_imagenet_sample
from lesionbench.data import build_eval_set
from lesionbench.evaluate import evaluate
from lesionbench.model_sources import create_model


@needs_fashion_mnist()
def test_shipped_default_model_reaches_its_recorded_accuracy(registry):
    """The committed weights give the test accuracy their JSON record states (≥ 90%)."""
    from lesionbench.models.fashion import training_record

    sources = {k: c.obj for k, c in registry.contributions("models").items()}
    model = create_model("fashion_alexnet", sources)
    raw = registry.get("datasets", "fashion_mnist").load(None, "test")
    data = build_eval_set(raw, np.arange(len(raw)), model.preprocess)
    result = evaluate(model.module, data.images, data.labels, batch_size=1000, device="cpu")
    record = training_record("fashion_alexnet")
    assert result.n_images == 10_000
    assert result.top1 >= 0.90
    assert result.top1 == pytest.approx(record["test_top1"], abs=2e-4)


@needs_imagenet_sample()
def test_flat_imagenet_sample_gets_imagenet_class_indices(registry):
    raw = registry.get("datasets", "image_folder").load(str(IMAGENET_SAMPLE), "val")
    assert len(raw) == 1000 and raw.num_classes == 1000
    names = sorted(p.name for p in IMAGENET_SAMPLE.iterdir())
    assert sorted(raw.labels.tolist()) == list(range(1000))  # one image per class
    first = raw.decode(int(np.flatnonzero(raw.labels == 0)[0]))
    assert first.size[0] > 0 and names[0].startswith("n01440764")
