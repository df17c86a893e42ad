"""The fast engine gives the naive loop's numbers: on a chain, a ResNet and EfficientNet-style nets."""

from __future__ import annotations

import pandas as pd
import pytest
import timm
import torch
from torch import nn

from conftest import FINISHED, write_fashion
from lesionbench.cli import main
from lesionbench.engine import NaiveEngine, SuffixEngine
from lesionbench.graph import ModelGraph, discover_layers, split_at, transition
from lesionbench.models.fashion import ARCHITECTURES
from lesionbench.perturbation import HookPerturbation
from lesionbench.store import read_results

NUMBERS = ["top1", "top5", "loss", "seed", "n_images"]
KEY = ["model", "layer", "perturbation", "level", "draw"]


def fx_of(model, example):
    """The model's traced graph, as the harness builds it (in-place writes made explicit)."""
    return ModelGraph.of(model, example[:1]).fx


@pytest.mark.parametrize(
    "build, shape",
    [
        (ARCHITECTURES["fashion_alexnet"], (1, 28, 28)),
        (ARCHITECTURES["fashion_resnet"], (1, 28, 28)),
        (ARCHITECTURES["fashion_mobilenetv3"], (1, 28, 28)),
        (lambda: timm.create_model("tf_efficientnet_lite0"), (3, 64, 64)),  # TF "SAME" padding
    ],
    ids=["chain", "resnet", "mobilenetv3", "efficientnet_lite0"],
)
def test_prefix_then_suffix_equals_the_whole_network_for_every_layer(build, shape):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(3, *shape)
    gm = fx_of(model, x)
    assert gm is not None
    with torch.inference_mode():
        reference = model(x)
        layers = discover_layers(model, x[:1])
        for layer in layers if len(layers) <= 16 else layers[::6] + layers[-1:]:  # a spread of depths
            cut = split_at(gm, layer.name)
            assert torch.equal(cut.suffix(*cut.prefix(x)), reference), layer.name


@pytest.mark.parametrize("arch", ["fashion_alexnet", "fashion_resnet", "fashion_mobilenetv3"])
def test_caches_step_from_layer_to_layer_in_one_forward_pass(arch):
    """Going through the layers in forward order, each layer's cache is computed from the previous
    one's (the first layer of the network runs once per batch in all, not once per layer) and
    equals what the layer's own prefix gives; a second block of the same layer recomputes nothing."""
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    images, labels = torch.randn(20, 1, 28, 28), torch.arange(20) % 10
    layers = discover_layers(model, images[:1])
    engine = SuffixEngine(ModelGraph.of(model, images[:1]), images, labels, 8, torch.device("cpu"))
    calls = []
    layers[0].module.register_forward_hook(lambda *_: calls.append(1))
    by_engine = 0
    with torch.inference_mode():
        for layer in layers:
            for _block in range(2):  # a second block of the layer recomputes nothing
                before = len(calls)
                with engine.for_layer(layer):
                    pass
                by_engine += len(calls) - before
            prefix = split_at(engine.graph.fx, layer.name).prefix
            cached = [
                engine._read(engine._cache.values, i) for i in range(len(engine._cache.values))
            ]  # inputs put back
            for b, values in zip(range(0, 20, 8), cached):
                expected = prefix(images[b : b + 8])
                assert len(values) == len(expected) and all(torch.equal(v, e) for v, e in zip(values, expected))
    # Three batches, one pass: every later cache stepped from the one before. Except in the ResNet,
    # whose downsampling shortcut (avgpool → conv) starts upstream of the previous cut: it needs
    # its own prefix pass.
    restarts = sum("downsample" in layer.name for layer in layers)
    assert by_engine == 3 * (1 + restarts) and restarts == (3 if arch == "fashion_resnet" else 0)
    engine.close()
    assert engine._cache is None


def test_skip_connections_cross_the_boundary():
    """In a residual block the shortcut is cached alongside the layer's input."""
    model = ARCHITECTURES["fashion_resnet"]().eval()
    gm = fx_of(model, torch.zeros(1, 1, 28, 28))
    assert split_at(gm, "conv1.0").n_boundary == 1
    assert split_at(gm, "layer1.0.conv2").n_boundary == 2


def test_suffix_sees_the_perturbation():
    """The split graphs share the model's parameters, so damage to the layer reaches the suffix."""
    model = ARCHITECTURES["fashion_alexnet"]().eval()
    x = torch.randn(2, 1, 28, 28)
    cut = split_at(fx_of(model, x), "conv3")
    with torch.no_grad():
        cached = cut.prefix(x)
        model.conv3.weight.zero_()
        model.conv3.bias.zero_()
        assert torch.equal(cut.suffix(*cached), model(x))


class TiedWeights(nn.Module):
    """The output layer shares its weight with a layer upstream of it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)
        self.out.weight = self.inp.weight

    def forward(self, x):
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


class InPlaceOnBoundary(nn.Module):
    """The suffix adds into a value computed upstream (``h.add_``): the cache must not change."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(h.add_(self.b(h)))


def _fast_equals_naive(model, layer_name, draws=3):
    from lesionbench.engine import NaiveEngine
    from lesionbench.perturbation import generator_for, perturbed
    from lesionbench.registry import create_registry

    noise = create_registry().get("perturbations", "weight_noise")
    images, labels = torch.randn(16, 8), torch.arange(16) % 8
    layer = next(l for l in discover_layers(model, images[:1]) if l.name == layer_name)
    fast = SuffixEngine(ModelGraph.of(model, images[:1]), images, labels, 8, torch.device("cpu"))
    naive = NaiveEngine(ModelGraph.of(model, images[:1]), images, labels, 8, torch.device("cpu"))
    with fast.for_layer(layer) as run_fast:
        for draw in range(draws):
            with perturbed(layer, noise, 2.0, generator_for(draw)):
                assert run_fast().loss == pytest.approx(naive.full().loss, rel=1e-6), draw
    return fast


def test_tied_weights_are_not_cached_upstream():
    model = TiedWeights().eval()
    assert split_at(fx_of(model, torch.zeros(1, 8)), "out", list(model.out.parameters())) is None
    fast = _fast_equals_naive(model, "out")
    assert any("no clean cut" in n for n in fast.notes)


def test_in_place_ops_do_not_corrupt_the_cache_between_cells():
    model = InPlaceOnBoundary().eval()
    gm = fx_of(model, torch.zeros(1, 8))
    assert split_at(gm, "b").mutates_boundary
    # nor does stepping to the next layer's cache write into this one's: that layer runs its own prefix
    assert transition(gm, split_at(gm, "b").boundary, split_at(gm, "head").boundary) is None
    assert transition(gm, split_at(gm, "a").boundary, split_at(gm, "b").boundary) is not None
    _fast_equals_naive(model, "b")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 1.0
        return self.fc(self.conv(x).flatten(1))


def test_untraceable_model_falls_back_to_full_passes_with_a_note():
    model = Untraceable().eval()
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    engine = SuffixEngine(ModelGraph.of(model, images[:1]), images, labels, 4, torch.device("cpu"))
    assert engine.graph.fx is None and "cannot trace" in engine.notes[0]
    layer = discover_layers(model, images[:1])[0]
    with engine.for_layer(layer) as run, torch.no_grad():
        assert run.many is None  # one cell at a time
        model.conv.weight.mul_(-1)  # damage: each cell must run the whole (damaged) network
        logits = model(images)
        expected = torch.nn.functional.cross_entropy(logits, labels).item()
        got = run()
        model.conv.weight.mul_(-1)
    assert got.loss == pytest.approx(expected, rel=1e-6)
    assert got.top1 == (logits.argmax(1) == labels).float().mean().item()


def test_over_budget_layers_spill_to_disk_or_fall_back_and_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("LESIONBENCH_SPILL_DIR", str(tmp_path))
    model = ARCHITECTURES["fashion_alexnet"]().eval()
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    layer = discover_layers(model, images[:1])[2]
    roomy = SuffixEngine(ModelGraph.of(model, images[:1]), images, labels, 4, torch.device("cpu"))
    with roomy.for_layer(layer) as run:
        expected = run()
    spilling = SuffixEngine(ModelGraph.of(model, images[:1]), images, labels, 4, torch.device("cpu"), budget_bytes=100)
    with spilling.for_layer(layer) as run:
        assert run.one != spilling.full and any(tmp_path.glob("lesionbench-spill-*/*.pt"))  # memory-mapped files
        got = run()
        assert (got.top1, got.top5, got.loss) == (expected.top1, expected.top5, expected.loss)
    first = set(tmp_path.glob("lesionbench-spill-*/*.pt"))  # kept for the layer's next block
    with spilling.for_layer(discover_layers(model, images[:1])[3]) as run:
        after = run()
    assert first.isdisjoint(tmp_path.glob("lesionbench-spill-*/*.pt"))  # the previous layer's files removed
    with roomy.for_layer(discover_layers(model, images[:1])[3]) as run:
        assert after.loss == run().loss  # the next layer's spilled cache, stepped from the spilled one, is right
    spilling.close()
    assert not any(tmp_path.glob("lesionbench-spill-*/*.pt"))  # and closing removes the rest
    assert any("spilled" in n for n in spilling.notes)
    no_spill = SuffixEngine(
        ModelGraph.of(model, images[:1]), images, labels, 4, torch.device("cpu"), budget_bytes=100, spill=False
    )
    with no_spill.for_layer(layer) as run:
        assert run.one == no_spill.full
    assert any("exceed" in n and "full passes" in n for n in no_spill.notes)


def test_spilled_files_go_after_an_error_midway_or_with_their_owner(tmp_path, monkeypatch):
    import gc

    from lesionbench.engine import SpilledBatches

    monkeypatch.setenv("LESIONBENCH_SPILL_DIR", str(tmp_path))
    model = ARCHITECTURES["fashion_alexnet"]().eval()
    images, labels = torch.randn(12, 1, 28, 28), torch.arange(12) % 10
    engine = SuffixEngine(ModelGraph.of(model, images[:1]), images, labels, 4, torch.device("cpu"), budget_bytes=100)
    prefix = split_at(engine.graph.fx, "conv3").prefix

    def inputs(i):  # the third batch fails, after two were spilled
        if i == 2:
            raise KeyboardInterrupt
        return engine._images(i)  # noqa: F821 - called before the `del engine` below

    with pytest.raises(KeyboardInterrupt):
        engine._boundary_values(prefix, "conv3", inputs)
    assert not any(tmp_path.glob("lesionbench-spill-*"))
    with engine.for_layer(discover_layers(model, images[:1])[2]):
        assert any(tmp_path.glob("lesionbench-spill-*/*.pt"))
    del engine  # never closed: the files still go with the object
    gc.collect()
    assert not any(tmp_path.glob("lesionbench-spill-*"))
    spilled = SpilledBatches(torch.device("cpu"))
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    spilled.append((x, 7))
    back, seven = spilled[0]
    assert torch.equal(back, x) and back.is_contiguous(memory_format=torch.channels_last) and seven == 7
    spilled.clear()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fmnist") / "fashion", n=40)


LAYERS = {
    "fashion_alexnet": [],  # all eight
    "fashion_resnet": ["conv1.0", "layer1.0.conv2", "layer3.0.downsample.1", "fc"],
    "fashion_mobilenetv3": ["conv_stem", "blocks.2.1.conv_dw", "blocks.2.1.se.conv_reduce", "classifier"],
}


@pytest.mark.parametrize("model", sorted(LAYERS))
def test_fast_and_naive_engines_write_the_same_results(model, data, tmp_path):
    study = tmp_path / "s.toml"
    layers = ", ".join(f'"{l}"' for l in LAYERS[model])
    study.write_text(
        f'name = "eq"\nmodels = ["{model}"]\nlayers = [{layers}]\ndraws = 2\nseed = 3\n'
        'batch_size = 16\ndevice = "cpu"\nbatch_draws = true\n'
        "[levels]\nsynapse_knockout = [0.0, 0.5]\nnode_knockout = [0.0, 0.5]\nweight_noise = [0.0, 1.0]\n"
        f'[dataset]\nname = "fashion_mnist"\npath = "{data}"\nn_images = 40\n'
    )
    frames = {}
    for engine in ("fast", "naive"):
        out = tmp_path / engine
        assert main(["run", str(study), "--out", str(out), "--engine", engine, "--no-publish"]) in FINISHED
        frames[engine] = read_results(out).sort_values(KEY, ignore_index=True)
    fast, naive = frames["fast"], frames["naive"]
    assert len(fast) == len(naive) > 0
    pd.testing.assert_frame_equal(fast[KEY], naive[KEY])
    pd.testing.assert_frame_equal(fast[NUMBERS], naive[NUMBERS], rtol=1e-6, atol=1e-7)
    # not vacuous: trained weights (random timm ResNets start with silent residual branches), so
    # damaging any studied layer moves the loss, and fast = naive says something about every one
    clean = naive.loc[naive["perturbation"] == "clean", "loss"].iloc[0]
    hit = naive[(naive["perturbation"] != "clean") & (naive["level"] > 0)]
    assert (hit.groupby("layer")["loss"].apply(lambda l: (l != clean).any())).all()


def test_channels_last_and_autocast_are_study_options(data, tmp_path):
    study = tmp_path / "s.toml"
    study.write_text(
        'name = "opts"\nmodels = [{ref = "fashion_alexnet", weights = "none"}]\nlayers = ["conv2", "fc7"]\n'
        'draws = 1\ndevice = "cpu"\nbatch_size = 16\n'
        "[levels]\nsynapse_knockout = [0.0, 0.5]\nnode_knockout = [0.0, 0.5]\nweight_noise = [0.0, 1.0]\n"
        f'[dataset]\nname = "fashion_mnist"\npath = "{data}"\nn_images = 40\n'
    )
    runs = {}
    for name, flags in {"plain": [], "nhwc": ["--channels-last"], "amp": ["--autocast"]}.items():
        out = tmp_path / name
        assert main(["run", str(study), "--out", str(out), *flags, "--no-publish"]) in FINISHED
        runs[name] = read_results(out).sort_values(KEY, ignore_index=True)
    plain, nhwc, amp = runs["plain"], runs["nhwc"], runs["amp"]
    pd.testing.assert_frame_equal(plain[NUMBERS], nhwc[NUMBERS], rtol=1e-4, atol=1e-5)
    assert (amp["seed"] == plain["seed"]).all()
    assert not amp["loss"].equals(plain["loss"])  # bfloat16 arithmetic really ran
    assert (amp["loss"] - plain["loss"]).abs().max() < 0.05
    import json

    fingerprints = {n: json.loads((tmp_path / n / "manifest.json").read_text())["fingerprint"] for n in runs}
    assert len(set(fingerprints.values())) == 3


@pytest.mark.parametrize(
    "arch, layer_name",
    [("fashion_alexnet", "conv3"), ("fashion_resnet", "layer1.0.conv1"), ("fashion_mobilenetv3", "blocks.2.1.conv_dw")],
)
def test_batched_draws_equal_one_pass_each(arch, layer_name):
    """``many`` (vmap over stacked perturbed copies) gives each copy's own numbers."""
    from lesionbench.model_sources import load_checkpoint_into
    from lesionbench.models.fashion import weights_path
    from lesionbench.perturbation import generator_for, perturbed

    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    load_checkpoint_into(model, weights_path(arch))  # trained: random timm resnets start with silent blocks
    images, labels = torch.randn(24, 1, 28, 28), torch.arange(24) % 10
    engine = SuffixEngine(ModelGraph.of(model, images[:1]), images, labels, 8, torch.device("cpu"))
    layer = next(l for l in discover_layers(model, images[:1]) if l.name == layer_name)
    from lesionbench.registry import create_registry

    noise = create_registry().get("perturbations", "node_knockout")  # touches the BatchNorm too, if any
    one, variants = [], []
    with engine.for_layer(layer) as run:
        assert run.many is not None and run.capacity(10**6) > 1
        for seed in range(3):
            with perturbed(layer, noise, 0.5, generator_for(seed)):
                one.append(run())
                variants.append({k: t.clone() for k, t in layer.named_tensors().items()})
        many = run.many(variants)
    assert len({r.loss for r in one}) == 3  # three really different draws
    for a, b in zip(one, many):
        assert a.top1 == b.top1 and a.top5 == b.top5 and a.loss == pytest.approx(b.loss, rel=1e-5)


class HookNoise(HookPerturbation):
    """A perturbation acting through a forward hook, as activation damage does."""

    def hooks(self, layer, level, generator):
        noise = torch.randn(1, generator=generator).item() * level
        return [layer.module.register_forward_hook(lambda m, i, out: out + noise)]


def test_hooked_perturbations_are_not_batched_and_match_the_naive_engine(tmp_path):
    from lesionbench.executors.local import execute
    from lesionbench.plan import prepare
    from lesionbench.registry import create_registry as make
    from lesionbench.store import RunDir
    from lesionbench.study import parse_study

    data = write_fashion(tmp_path / "fashion", n=30)
    from types import SimpleNamespace

    from lesionbench.hookspecs import hookimpl

    registry = make(
        [
            (
                "hook-test",
                SimpleNamespace(
                    lesionbench_perturbations=hookimpl(
                        lambda: [HookNoise("hook_noise", "noise added by a hook", (0.0, 1.0), (0.0, 1.0))]
                    )
                ),
            )
        ]
    )
    frames = {}
    for engine in ("fast", "naive"):
        study = parse_study(
            {
                "name": "h",
                "models": [{"ref": "fashion_alexnet", "weights": "none"}],
                "layers": ["conv2"],
                "perturbations": ["hook_noise"],
                "draws": 3,
                "engine": engine,
                "device": "cpu",
                "batch_draws": True,
                "dataset": {"name": "fashion_mnist", "path": str(data), "n_images": 30},
            }
        )
        plan = prepare(study, registry)
        run = RunDir.create(tmp_path / engine, study.to_dict(), plan.fingerprint())
        execute(plan, run)
        frames[engine] = run.frame().sort_values(KEY, ignore_index=True)
    assert frames["fast"]["loss"].nunique() > 2  # the hook really changed the outputs, draw by draw
    pd.testing.assert_frame_equal(frames["fast"][NUMBERS], frames["naive"][NUMBERS], rtol=1e-6, atol=1e-7)


class NeedsSmallBatches(nn.Module):
    """Raises CUDA's out-of-memory error for batches above 3 images, as a small GPU would."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        if len(x) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.fc(x)


@pytest.mark.parametrize("engine_cls", [SuffixEngine, NaiveEngine], ids=["fast", "naive"])
def test_batch_size_is_halved_until_the_pass_fits(engine_cls):
    torch.manual_seed(0)
    model = NeedsSmallBatches().eval()
    images, labels = torch.randn(10, 4), torch.arange(10)
    engine = engine_cls(ModelGraph.of(model, images[:1]), images, labels, 16, torch.device("cpu"))
    result = engine.full()
    assert engine.batch_size == 2 and any("batch size lowered to 2" in n for n in engine.notes)
    with torch.no_grad():
        expected = (model.fc(images).argmax(1) == labels).float().mean().item()
    assert result.top1 == pytest.approx(expected) and result.n_images == 10
