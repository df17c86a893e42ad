"""A run loads only what it uses (issue #25, fixed costs): no torchvision, timm, scipy, sympy or
matplotlib for a Fashion-MNIST study of single draws run with ``--no-publish``, and each piece of
those libraries' work that a run does without them gives their results, checked against them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import stats
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp
from torchvision import transforms
from torchvision.transforms import functional as F

from conftest import FINISHED
from lesionbench.fx_cuts import _TensorNodes, _Tracer
from lesionbench.models.fashion import FASHION_MEAN, FASHION_STD, grey_28_preprocess
from lesionbench.pixels import NotCompact, ToNormalisedTensor, _pil_to_uint8, normalise, split_normalisation
from lesionbench.scores import CHANCE_ALPHA, beyond_chance, binomial_sf
from property_models import build, specs

SOME = settings(max_examples=60, deadline=None, derandomize=True, database=None)
HEAVY = ("torchvision", "timm", "scipy", "sympy", "matplotlib")

PROBE = """
import json, sys
from lesionbench.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
"""


def test_a_run_of_single_draws_without_publishing_imports_none_of_the_heavy_libraries(fashion, tmp_path):
    """torchvision and timm (1.8 CPU s; torchvision imports torch._dynamo), scipy (0.7 s), sympy
    (0.5 s, through torch.fx's ShapeProp) and matplotlib stay out of a run that does not need them."""
    args = [
        "run",
        "demo",
        "--no-publish",
        "--data",
        str(fashion),
        "--n-images",
        "20",
        "--draws",
        "1",
        "--levels",
        "0,0.5",
        "--layers",
        "conv1,fc8",
        "--out",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE % (HEAVY,), *args], capture_output=True, text=True, env=env, timeout=300
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] in FINISHED, done.stderr
    assert report["loaded"] == []
    assert (tmp_path / "run" / "results.csv").is_file()


# ------------------------------------------------------------------ preprocessing without torchvision

MODES = ("L", "RGB", "RGBA", "LA", "P", "I", "F", "1", "CMYK", "I;16")


@st.composite
def pictures(draw) -> Image.Image:
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 45)), draw(st.integers(1, 45))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
    if mode == "RGBA":
        base = base.convert("RGBA")
        base.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L"))
        return base
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 2**16, (h, w), dtype=np.uint16)).convert("I;16")
    return base.convert(mode)


def torchvision_grey_28():
    """The pipeline the Fashion models used before (torchvision's own transforms): the oracle."""
    return transforms.Compose(
        [
            transforms.Grayscale(1),
            transforms.Resize((28, 28)),
            transforms.ToTensor(),
            transforms.Normalize((FASHION_MEAN,), (FASHION_STD,)),
        ]
    )


@SOME
@given(pictures())
def test_the_fashion_preprocessing_gives_torchvisions_floats_bit_for_bit(img):
    ours, theirs = grey_28_preprocess()(img), torchvision_grey_28()(img)
    assert ours.shape == theirs.shape == (1, 28, 28) and ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("x", [torch.rand(3, 30, 20), np.zeros((30, 20, 3), dtype=np.uint8)], ids=["tensor", "array"])
def test_what_is_not_a_pil_image_gets_torchvisions_own_answer(x):
    """Not a PIL image: the torchvision pipeline (the fallback) answers, here with its own error."""
    with pytest.raises(Exception) as theirs:
        torchvision_grey_28()(x)
    with pytest.raises(type(theirs.value)):
        grey_28_preprocess()(x)


def test_a_pipeline_without_fallback_refuses_what_it_cannot_make_exactly():
    pipeline = ToNormalisedTensor([], (0.5,), (0.5,))
    with pytest.raises(NotCompact):
        pipeline(Image.new("F", (4, 4)))
    with pytest.raises(NotCompact):
        pipeline(torch.zeros(1, 4, 4))


@SOME
@given(
    st.integers(1, 4),
    st.sampled_from([1, 3, 4]),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(0, 2**32 - 1),
)
def test_normalise_is_torchvisions_to_tensor_then_normalize_bit_for_bit(n, c, h, w, seed):
    rng = np.random.default_rng(seed)
    batch = torch.from_numpy(rng.integers(0, 256, (n, c, h, w), dtype=np.uint8))
    mean = tuple(float(v) for v in rng.uniform(-1, 1, c))
    std = tuple(float(v) for v in rng.uniform(0.05, 2, c))
    theirs = torch.stack([F.normalize(F.to_tensor(img.permute(1, 2, 0).numpy()), mean, std) for img in batch])
    assert torch.equal(normalise(batch, mean, std), theirs)


def test_normalise_refuses_a_zero_standard_deviation_as_torchvision_does():
    batch = torch.zeros(1, 2, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError):
        F.normalize(batch.float(), (0.0, 0.0), (1.0, 0.0))
    with pytest.raises(ValueError):
        normalise(batch, (0.0, 0.0), (1.0, 0.0))


@SOME
@given(pictures())
def test_pil_images_become_the_uint8_tensors_torchvision_makes(img):
    if img.mode not in ("L", "RGB", "RGBA"):
        with pytest.raises(NotCompact):
            _pil_to_uint8(img)
        return
    ours, theirs = _pil_to_uint8(img), F.pil_to_tensor(img)
    assert ours.dtype == theirs.dtype == torch.uint8 and torch.equal(ours, theirs)


def test_split_normalisation_cuts_our_pipeline_and_needs_no_torchvision_for_it():
    pipeline = grey_28_preprocess()
    to_uint8, mean, std = split_normalisation(pipeline)
    img = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) % 251, mode="L")
    assert torch.equal(normalise(to_uint8(img), mean, std), torchvision_grey_28()(img))
    code = (
        "import sys; from lesionbench.models.fashion import grey_28_preprocess; "
        "from lesionbench.pixels import split_normalisation; "
        "assert split_normalisation(grey_28_preprocess()) is not None; "
        "assert split_normalisation(lambda im: im) is None; "
        "print('torchvision' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# ------------------------------------------------------------------------ the binomial test, no scipy


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 4000), st.floats(0, 1), st.one_of(st.floats(1e-4, 1 - 1e-4), st.sampled_from([0.1, 0.01, 0.001])))
def test_the_exact_binomial_tail_is_scipys_binomial_test(n, share, p):
    k = min(n, int(round(share * n)))
    ours = binomial_sf(k, n, p)
    theirs = stats.binomtest(k, n, p, alternative="greater").pvalue
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-300)
    if abs(theirs - CHANCE_ALPHA) > 1e-9:  # the verdict of the chance check is scipy's
        clean = k / n
        assert beyond_chance(clean, n, p) == (theirs < CHANCE_ALPHA)


def test_the_binomial_tail_at_its_edges():
    assert binomial_sf(0, 10, 0.3) == 1.0
    assert binomial_sf(11, 10, 0.3) == 0.0
    assert binomial_sf(3, 10, 0.0) == 0.0 and binomial_sf(3, 10, 1.0) == 1.0
    assert binomial_sf(10, 10, 0.5) == pytest.approx(0.5**10, rel=1e-12)


# ------------------------------------------------ which graph nodes hold tensors, without ShapeProp


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(specs(max_blocks=3))
def test_the_nodes_holding_tensors_are_those_shape_prop_annotates(spec):
    """Over generated models (the property harness's grammar): the nodes :class:`_TensorNodes` finds
    are the nodes to which torch.fx's ShapeProp gives ``tensor_meta``, the pass it replaces."""
    torch.set_num_threads(1)
    model, images, _labels, _expects, _parts = build(spec)
    try:
        graph = _Tracer().trace(model)
    except Exception:  # untraceable models take the naive engine: nothing to compare
        return
    ours_gm, theirs_gm = fx.GraphModule(model, graph), fx.GraphModule(model, graph)
    with torch.no_grad():
        try:
            ShapeProp(theirs_gm).propagate(images)
        except RuntimeError as exc:  # ShapeProp wraps the node's own error
            with pytest.raises(type(exc.__cause__)):
                _TensorNodes(ours_gm).nodes(images)
            return
        ours = _TensorNodes(ours_gm).nodes(images)
    assert {n.name for n in ours} == {n.name for n in theirs_gm.graph.nodes if "tensor_meta" in n.meta}
