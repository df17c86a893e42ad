"""Studies at scale: uint8 evaluation sets, image shards sized by the memory budget, synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import (
    FINISHED,  # noqa: E402
    write_fashion,
)
from lesionbench.api import load_outcomes
from lesionbench.cli import main
from lesionbench.data import RawDataset, build_eval_set
from lesionbench.engine import _INPUT, SuffixEngine
from lesionbench.errors import LesionbenchError
from lesionbench.evaluate import evaluate
from lesionbench.graph import ModelGraph
from lesionbench.memory import parse_bytes
from lesionbench.models.fashion import ARCHITECTURES, grey_28_preprocess
from lesionbench.pixels import DiskStore, Pixels
from lesionbench.plugins.synthetic import SyntheticImages, parse_shape

KEY = ["model", "layer", "perturbation", "level", "draw"]
TIMING = ["seconds", "images_per_s"]


def _raw(images: list[Image.Image]) -> RawDataset:
    return RawDataset("pics", "<memory>", np.arange(len(images)) % 3, 3, lambda i: images[i])


def _pictures(n: int, size: int = 37, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(5)
    shape = (size, size + 3) if mode == "L" else (size, size + 3, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(n)]


PIPELINES = {
    "resize-crop-normalise": transforms.Compose(
        [
            transforms.Resize(20),
            transforms.CenterCrop(16),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    ),
    "grey-28": grey_28_preprocess(),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
@pytest.mark.parametrize("memory", [None, 1], ids=["in-memory", "on-disk"])
def test_uint8_sets_read_back_the_floats_of_the_float_pipeline(name, memory):
    """Each batch, normalised when read, equals (bit for bit) the stacked output of the whole
    pipeline, whether the uint8 images are in memory or in a file; the store is a quarter the size."""
    pipeline = PIPELINES[name]
    pictures = _pictures(7)
    reference = torch.stack([pipeline(p) for p in pictures])
    eval_set = build_eval_set(_raw(pictures), np.arange(7), pipeline, memory_bytes=memory)
    images = eval_set.images
    assert isinstance(images, Pixels) and images.on_disk == (memory == 1)
    assert images.nbytes * 4 == reference.numel() * reference.element_size()
    assert torch.equal(torch.cat([images[0:3], images[3:6], images[6:7]]), reference)
    assert torch.equal(images[4, 0], reference[4, 0])
    assert torch.equal(images.to(torch.bfloat16)[1:5], reference.to(torch.bfloat16)[1:5])
    last = images.contiguous(memory_format=torch.channels_last)[0:2]
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, reference[0:2])


def test_a_pipeline_that_is_not_resize_then_normalise_keeps_floats():
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Lambda(lambda t: t * 2)])
    pictures = _pictures(3)
    eval_set = build_eval_set(_raw(pictures), np.arange(3), pipeline)
    assert isinstance(eval_set.images, torch.Tensor)
    assert torch.equal(eval_set.images, torch.stack([pipeline(p) for p in pictures]))


def test_images_of_another_mode_fall_back_to_floats_for_the_whole_set():
    """A 1-bit image's ToTensor is not uint8 ÷ 255: the set is built in float32, still exact."""
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.25,))])
    pictures = _pictures(2, mode="L") + [_pictures(1, mode="L")[0].convert("1")]
    eval_set = build_eval_set(_raw(pictures), np.arange(3), pipeline)
    assert isinstance(eval_set.images, torch.Tensor)
    assert torch.equal(eval_set.images, torch.stack([pipeline(p) for p in pictures]))


def test_a_disk_store_removes_its_file_and_refuses_what_the_disk_cannot_hold(monkeypatch, tmp_path):
    monkeypatch.setenv("LESIONBENCH_SPILL_DIR", str(tmp_path))
    store = DiskStore(3, (2, 2), torch.uint8)
    store[1] = torch.full((2, 2), 7, dtype=torch.uint8)
    assert store[1].tolist() == [[7, 7], [7, 7]] and store[0:3].shape == (3, 2, 2)
    assert len(list(tmp_path.iterdir())) == 1
    store.close()
    assert not list(tmp_path.iterdir())
    with pytest.raises(LesionbenchError, match="needs .* GiB on disk"):
        DiskStore(10**9, (3, 224, 224), torch.uint8)


def test_memory_sizes_parse_and_bad_ones_are_refused():
    assert parse_bytes("1536M") == 1536 * 1024**2 and parse_bytes("2GiB") == 2 * 1024**3 and parse_bytes("100") == 100
    for bad in ("lots", "-5M", "0"):
        with pytest.raises(LesionbenchError):
            parse_bytes(bad)


# ---------------------------------------------------------------- shards


def test_shards_fit_the_budget_in_whole_batches_and_the_input_costs_nothing():
    torch.manual_seed(0)
    model = ARCHITECTURES["fashion_alexnet"]().eval()
    images, labels = torch.randn(50, 1, 28, 28), torch.arange(50) % 10
    graph = ModelGraph.of(model, images[:1])
    first, second = graph.layers[0], graph.layers[1]
    engine = SuffixEngine(graph, images, labels, 4, torch.device("cpu"), budget_bytes=1)
    assert engine.bytes_per_image(first) == 0  # the first layer's boundary is the input itself
    assert engine.shards(first) == [(0, 50)]
    per_image = engine.bytes_per_image(second)
    with torch.inference_mode():
        assert per_image == sum(v.numel() * v.element_size() for v in graph.split(second).prefix(images[:1]))
    engine.budget_bytes = 10 * per_image + 1  # room for 10 images: shards of two batches of 4
    assert engine.shards(second) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 48), (48, 50)]
    engine.budget_bytes = 50 * per_image
    assert engine.shards(second) == [(0, 50)]
    with engine.for_layer(first) as run_eval:  # nothing is cached for it, and the pass is still right
        assert all(batch == (_INPUT,) for batch in engine._cache.values)
        reference = evaluate(model, images, labels, 4)
        assert np.array_equal(run_eval().predictions, reference.predictions)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fmnist") / "fashion", n=36)


@pytest.mark.parametrize("batch_draws", [False, True])
def test_a_sharded_study_equals_the_unsharded_one_row_for_row_and_image_for_image(
    fashion, tmp_path, monkeypatch, batch_draws
):
    study = tmp_path / "s.toml"
    study.write_text(
        'name = "shards"\nmodels = ["fashion_alexnet"]\nlayers = ["conv1", "conv3", "fc6", "fc8"]\ndraws = 2\n'
        f'seed = 3\nbatch_size = 8\ndevice = "cpu"\nbatch_draws = {str(batch_draws).lower()}\n'
        "[levels]\nsynapse_knockout = [0.0, 0.5]\nweight_noise = [1.0]\n"
        f'[dataset]\nname = "fashion_mnist"\npath = "{fashion}"\nn_images = 36\n'
    )
    runs = {}
    for name, budget in (("whole", "1G"), ("sharded", "12K")):
        monkeypatch.setenv("LESIONBENCH_MEMORY_BUDGET", budget)
        out = tmp_path / name
        assert (
            main(
                [
                    "run",
                    str(study),
                    "--out",
                    str(out),
                    "--perturbations",
                    "synapse_knockout,weight_noise",
                    "--no-publish",
                ]
            )
            in FINISHED
        )
        frame, outcomes = load_outcomes(out)
        runs[name] = (frame.sort_values(KEY, ignore_index=True), outcomes, (out / "run.log").read_text())
    (whole, whole_out, whole_notes), (sharded, sharded_out, sharded_notes) = runs["whole"], runs["sharded"]
    assert "extra cell passes" in sharded_notes and "extra cell passes" not in whole_notes  # it did shard
    columns = [c for c in whole.columns if c not in TIMING + ["outcome"]]
    pd.testing.assert_frame_equal(whole[columns], sharded[columns])  # exact: no tolerance
    assert (whole["loss"] > 0).all() and whole["top1"].nunique() > 1  # numbers that could differ
    order_w, order_s = whole_out.keys.set_index(KEY).index, sharded_out.keys.set_index(KEY).index
    rows = [order_s.get_loc(k) for k in order_w]
    assert np.array_equal(whole_out.top1, sharded_out.top1[rows])
    assert np.array_equal(whole_out.top5, sharded_out.top5[rows])
    assert (whole_out.top1 >= 0).all()  # every image evaluated in every cell


# ---------------------------------------------------------------- synthetic


def test_synthetic_images_are_deterministic_of_any_shape_and_need_no_files():
    raw = SyntheticImages().load("n=12,size=40,classes=5,channels=1,seed=2", "test")
    assert len(raw) == 12 and raw.num_classes == 5 and raw.labels.tolist() == [i % 5 for i in range(12)]
    image = raw.decode(7)
    assert image.size == (40, 40) and image.mode == "L"
    again = SyntheticImages().load("seed=2,channels=1,classes=5,size=40,n=12", "test").decode(7)
    assert np.array_equal(np.asarray(image), np.asarray(again))
    other = SyntheticImages().load("n=12,size=40,classes=5,channels=1,seed=3", "test").decode(7)
    assert not np.array_equal(np.asarray(image), np.asarray(other))
    assert SyntheticImages().load(None, "test").decode(0).size == (224, 224)


@pytest.mark.parametrize(
    "path, match",
    [("n=0", "at least 1"), ("size=big", "whole number"), ("pixels=3", "key=value"), ("channels=2", "1 or 3")],
)
def test_bad_synthetic_shapes_are_refused_in_one_line(path, match):
    with pytest.raises(LesionbenchError, match=match):
        parse_shape(path)


def test_a_spill_the_disk_cannot_hold_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from collections import namedtuple

    import lesionbench.memory as memory

    monkeypatch.setenv("LESIONBENCH_SPILL_DIR", str(tmp_path))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda _p: usage(2 * 1024**3, 2 * 1024**3 - 10_000, 10_000))
    model = ARCHITECTURES["fashion_alexnet"]().eval()
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    graph = ModelGraph.of(model, images[:1])
    engine = SuffixEngine(graph, images, labels, 4, torch.device("cpu"), budget_bytes=100)
    with engine.for_layer(graph.layers[2]) as run_eval:
        assert run_eval.one == engine.full
    assert not list(tmp_path.iterdir())
    assert any("on disk" in n and "full passes" in n for n in engine.notes)
