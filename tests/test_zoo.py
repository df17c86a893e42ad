"""Layer kinds of the timm zoo: discovery, node knockout against its definition, and fast = naive.

Node knockout's definition (plugins/node_knockout.py): the chosen output units of a layer emit
zero — and stay zero through every BatchNorm they feed, wherever the forward pass takes them
(after an activation, a pooling, a reshape, a concatenation at an offset, a channel slice) and at
every use of a module called more than once. Each test damages a layer, finds the silenced units
from the damaged weights themselves (rows that became all zero), and checks the outputs of the
network's own modules: the silenced channels are exactly zero, every other channel is unchanged.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from lesionbench.api import run
from lesionbench.graph import ModelGraph
from lesionbench.layers import Layer
from lesionbench.perturbation import generator_for, perturbed
from lesionbench.registry import create_registry

NORMS = (nn.modules.batchnorm._BatchNorm,)


@pytest.fixture(scope="module")
def knockout():
    return create_registry().get("perturbations", "node_knockout")


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorms with non-trivial scale, shift and statistics (a shift is what a silenced unit would
    emit if its norm were left alone), and no zero-initialised weight anywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        norm_tensors = {id(t) for m in model.modules() if isinstance(m, NORMS) for t in m.parameters(recurse=False)}
        for name, p in model.named_parameters():
            if id(p) in norm_tensors or name.endswith("bias") or p.numel() == 0:
                continue
            if p.dim() >= 2 and not p.abs().max():  # zero-initialised last conv of a residual branch
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() < 2 and p.abs().max() < 1e-3:  # layer-scale gammas (1e-6), skip-init gains (0)
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
    return model.eval()


def outputs_of(model: nn.Module, modules: list[nn.Module], x: torch.Tensor) -> list[list[torch.Tensor]]:
    """Each module's output at every call during one forward pass."""
    seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}
    handles = [m.register_forward_hook(lambda mod, _i, out: seen[mod].append(out.detach().clone())) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [seen[m] for m in modules]


def silenced_units(layer: Layer) -> torch.Tensor:
    return (layer.module.weight.flatten(1) == 0).all(dim=1).nonzero().flatten()


def assert_silent_through_norms(model, layer: Layer, x, knockout, level=0.5, expect_norms=None, others_kept=False):
    """Node knockout of ``layer``: every BatchNorm output channel that carries a silenced unit is
    zero, at every call of the norm, and was not zero before. ``others_kept``: the norms' other
    channels are bit-identical too (true when no other path leads from the layer to the norms)."""
    norms = list(dict.fromkeys(layer.norms))
    assert expect_norms is None or len(norms) == expect_norms, [type(n).__name__ for n in norms]
    clean = outputs_of(model, norms, x)
    with perturbed(layer, knockout, level, generator_for(0)):
        units = silenced_units(layer)
        assert len(units) == int(level * layer.out_units)
        damaged = outputs_of(model, norms, x)
        reached: dict[nn.Module, torch.Tensor] = {}
        for norm, channels in layer.norm_channels(units):
            reached[norm] = torch.cat([reached.get(norm, channels[:0]), channels])
    assert reached, "the silenced units reach no BatchNorm"
    for norm, before, after in zip(norms, clean, damaged):
        assert len(before) == len(after) >= 1
        channels = reached.get(norm, torch.tensor([], dtype=torch.long))
        others = torch.tensor([c for c in range(after[0].shape[1]) if c not in set(channels.tolist())])
        for b, a in zip(before, after):  # every call of the norm
            assert torch.equal(a[:, channels], torch.zeros_like(a[:, channels])), norm
            if len(channels):
                assert (b[:, channels] != 0).any()  # they were not silent before
            if others_kept:
                assert torch.equal(a[:, others], b[:, others]), norm
    return units, reached


# ---------------------------------------------------------------- conv kinds


class ConvKinds(nn.Module):
    """A plain conv; a depthwise conv without bias; a grouped conv without bias whose BatchNorm
    comes after an activation (ReLU6); a pointwise conv → hardswish → BatchNorm."""

    def __init__(self):
        super().__init__()
        self.plain, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.depthwise, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.grouped, self.bn2 = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(12)
        self.pointwise, self.bn3 = nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.plain(x)))
        x = torch.relu(self.bn1(self.depthwise(x)))
        x = self.bn2(nn.functional.relu6(self.grouped(x)))  # BatchNorm after the activation
        x = self.bn3(nn.functional.hardswish(self.pointwise(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(
    "name, norm", [("plain", "bn0"), ("depthwise", "bn1"), ("grouped", "bn2"), ("pointwise", "bn3")]
)
def test_conv_kinds_silence_whole_channels_through_their_batchnorm(name, norm, knockout):
    model = randomise_norms(ConvKinds())
    x = torch.randn(2, 3, 8, 8)
    layers = {l.name: l for l in ModelGraph.of(model, x[:1]).layers}
    assert list(layers) == ["plain", "depthwise", "grouped", "pointwise", "head"]
    layer = layers[name]
    assert layer.norm_names == (norm,)
    units, reached = assert_silent_through_norms(model, layer, x, knockout, expect_norms=1, others_kept=True)
    assert torch.equal(reached[getattr(model, norm)], units)  # the unit's own channel
    if layer.module.bias is None:
        assert layer.weight_and_bias() == [layer.module.weight]


# ---------------------------------------------------------------- concatenations and slices


class DenseStyle(nn.Module):
    """DenseNet/DPN-style: conv outputs concatenated (at offsets) before BatchNorms, a channel
    slice that lets only part of a layer's units through, a pooling between a conv and a concat.

    bn_a's 10 channels: [stem 0-5 | grow 0-3]; bn_b's 12: [grow 0-3 | split 4-7 | split 0-3]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.grow = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(10)
        self.split = nn.Conv2d(10, 8, 1)
        self.bn_b = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        s = self.stem(x)
        g = self.grow(s)
        a = torch.relu(self.bn_a(torch.cat([s, g], dim=1)))
        p = self.split(a)
        low, high = p[:, :4], p[:, 4:]
        b = self.bn_b(torch.cat([nn.functional.max_pool2d(torch.cat([g, high], 1), 3, 1, 1), low], dim=1))
        return self.head(torch.relu(b).mean((2, 3)))


def test_units_are_followed_through_concatenations_slices_and_pooling(knockout):
    model = randomise_norms(DenseStyle())
    x = torch.randn(2, 3, 8, 8)
    layers = {l.name: l for l in ModelGraph.of(model, x[:1]).layers}
    grow, split, stem = layers["grow"], layers["split"], layers["stem"]
    assert list(zip(stem.norm_names, stem.norm_spans)) == [("bn_a", (0, 0, 6))]
    assert list(zip(grow.norm_names, grow.norm_spans)) == [("bn_a", (6, 0, 4)), ("bn_b", (0, 0, 4))]
    # split's units 4-7 reach bn_b at channels 4-7 (after grow's 4), its units 0-3 at channels 8-11
    assert list(zip(split.norm_names, split.norm_spans)) == [("bn_b", (0, 4, 8)), ("bn_b", (8, 0, 4))]
    for layer, places in ((stem, 1), (grow, 2), (split, 1)):  # norm channels each unit reaches
        units, reached = assert_silent_through_norms(model, layer, x, knockout)
        assert sum(len(c) for c in reached.values()) == len(units) * places


def test_densenet_units_are_silenced_in_every_later_batchnorm_of_their_block(knockout):
    """timm DenseNet: a layer's new features are concatenated into the input of every later layer
    of its dense block and of the transition; each of those norms gets the unit at its offset."""
    model = randomise_norms(small_densenet())
    x = torch.randn(2, 3, 32, 32)
    layers = {l.name: l for l in ModelGraph.of(model, x[:1]).layers}
    conv2 = layers["features.denseblock1.denselayer1.conv2"]
    later = [f"features.denseblock1.denselayer{i}.norm1" for i in range(2, 7)] + ["features.transition1.norm"]
    assert list(conv2.norm_names) == later
    assert set(conv2.norm_spans) == {(16, 0, 8)}  # after the stem's 16 channels
    assert_silent_through_norms(model, conv2, x, knockout, expect_norms=6)
    transition = layers["features.transition1.conv"]  # conv → avg-pool → concatenated first
    assert len(transition.norms) == 3 and set(transition.norm_spans) == {(0, 0, 32)}
    assert_silent_through_norms(model, transition, x, knockout, expect_norms=3)


def small_densenet(**options):
    """timm's DenseNet code with few layers: growth 8, dense blocks of 6, 2, 2, 2 layers."""
    from timm.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(6, 2, 2, 2), **options)


def test_linear_units_reach_a_batchnorm1d_through_a_flatten(knockout):
    """LeViT's Linear + BatchNorm1d: (B, N, C) flattened to (B·N, C) before the norm."""
    model = randomise_norms(timm.create_model("levit_128s", img_size=64, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    layers = {l.name: l for l in ModelGraph.of(model, x[:1]).layers}
    qkv = layers["stages.0.blocks.0.attn.qkv.linear"]
    assert qkv.norm_names == ("stages.0.blocks.0.attn.qkv.bn",)
    assert_silent_through_norms(model, qkv, x, knockout, expect_norms=1, others_kept=True)
    assert not layers["head.linear"].norms


def test_a_linear_layer_never_feeds_a_batchnorm_over_another_axis():
    """A (B, N, C) Linear output normalised by a BatchNorm1d over N: the units are not its channels."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(18, 2)).eval()
    layers = ModelGraph.of(model, torch.zeros(1, 3, 4)).layers
    assert layers[0].norms == ()


# ---------------------------------------------------------------- modules called more than once


class Shared(nn.Module):
    """One conv used on two branches, each followed by its own BatchNorm, and again downstream of
    another layer; the results are summed."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.mid = nn.Conv2d(4, 4, 1)
        self.inp = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = self.inp(x)
        a = torch.relu(self.bn1(self.shared(x)))
        b = torch.relu(self.bn2(self.shared(nn.functional.avg_pool2d(x, 2))))
        c = torch.relu(self.bn3(self.shared(self.mid(a))))
        return self.head(a.mean((2, 3)) + b.mean((2, 3)) + c.mean((2, 3)))


def test_a_module_called_more_than_once_is_one_layer_silenced_at_every_use(knockout):
    model = randomise_norms(Shared())
    x = torch.randn(2, 3, 8, 8)
    layers = ModelGraph.of(model, x[:1]).layers
    assert [l.name for l in layers] == ["inp", "shared", "mid", "head"]  # once, at its first use
    shared = layers[1]
    assert shared.norm_names == ("bn1", "bn2", "bn3")
    assert_silent_through_norms(model, shared, x, knockout, expect_norms=3)
    clean = outputs_of(model, [model.shared], x)[0]
    with perturbed(shared, knockout, 0.5, generator_for(0)):
        units = silenced_units(shared)
        for out in outputs_of(model, [model.shared], x)[0]:  # three calls, each silent on those units
            assert torch.equal(out[:, units], torch.zeros_like(out[:, units]))
    assert len(clean) == 3


PAPER_LEVELS = {"synapse_knockout": [0.0, 0.5], "node_knockout": [0.0, 0.5], "weight_noise": [0.0, 1.0]}


def fast_and_naive(model, images, labels, tmp_path, **study) -> str:
    """Run the paper's three perturbations with both engines; assert equal losses (1e-5 relative)
    and top-1, and that every damaged cell moved the loss (so equality is not vacuous). Returns
    the fast run's run.log ("" if none was written)."""
    study = {"perturbations": list(PAPER_LEVELS), "levels": PAPER_LEVELS, "draws": 1, "device": "cpu", **study}
    key = ["layer", "perturbation", "level", "draw"]
    got = {}
    for engine in ("fast", "naive"):
        rows = run(study, out=tmp_path / engine, model=model, data=(images, labels), engine=engine)
        got[engine] = rows.sort_values(key, ignore_index=True)
    fast, naive = got["fast"], got["naive"]
    assert fast[key].equals(naive[key]) and (fast["top1"] == naive["top1"]).all()
    torch.testing.assert_close(torch.tensor(fast["loss"].values), torch.tensor(naive["loss"].values), rtol=1e-5, atol=0)
    clean = naive.loc[naive["perturbation"] == "clean", "loss"].iloc[0]
    assert (naive.loc[naive["level"] > 0, "loss"] != clean).all(), "a damaged cell left the loss unchanged"
    log = tmp_path / "fast" / "run.log"
    return log.read_text() if log.exists() else ""


def test_fast_engine_on_a_module_called_more_than_once_equals_naive(tmp_path):
    model = randomise_norms(Shared())
    log = fast_and_naive(model, torch.randn(8, 3, 8, 8), torch.arange(8) % 5, tmp_path, draws=2)
    # every use of `shared` lies downstream of its first: the cut there holds them all, no fallback
    assert "full passes" not in log


# ---------------------------------------------------------------- attention


def test_multihead_attention_out_proj_is_discovered_and_silenced(knockout):
    """nn.MultiheadAttention reads out_proj's weight through a functional call, never calling the
    module: the probe finds it by the read; node knockout zeroes the attention output's units.
    Its packed in_proj_weight is a plain Parameter, not a Conv/Linear module: not a layer."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x)
            return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))

    model = Attn().eval()
    x = torch.randn(2, 5, 6)
    layers = {l.name: l for l in ModelGraph.of(model, x[:1]).layers}
    assert list(layers) == ["embed", "attn.out_proj", "head"]
    out_proj = layers["attn.out_proj"]
    with perturbed(out_proj, knockout, 0.5, generator_for(0)):
        units = silenced_units(out_proj)
        with torch.no_grad():
            h = model.embed(x)
            out = model.attn(h, h, h, need_weights=False)[0]
    assert len(units) == 4 and torch.equal(out[..., units], torch.zeros_like(out[..., units]))


def test_timm_vit_attention_layers_in_forward_order_and_fast_equals_naive(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5).eval()
    x = torch.randn(6, 3, 32, 32)
    names = [l.name for l in ModelGraph.of(model, x[:1]).layers]
    assert names == ["patch_embed.proj"] + [
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ] + ["head"]
    log = fast_and_naive(
        model, x, torch.arange(6) % 5, tmp_path, layers=["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv"]
    )
    assert "full passes" not in log


# ---------------------------------------------------------------- fused BatchNorm


def test_fused_batchnorm_conv_silences_through_its_own_bias(knockout):
    """A re-parameterised MobileOne: each conv carries its BatchNorm folded into weight and bias;
    node knockout zeroes the filter and the bias, so the unit's output is exactly zero."""
    from timm.utils.model import reparameterize_model

    model = reparameterize_model(randomise_norms(timm.create_model("mobileone_s0", num_classes=10)))
    x = torch.randn(2, 3, 32, 32)
    graph = ModelGraph.of(model, x[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    layer = graph.layers[3]
    assert layer.norms == () and layer.module.bias is not None
    with perturbed(layer, knockout, 0.5, generator_for(0)):
        units = silenced_units(layer)
        out = outputs_of(model, [layer.module], x)[0][0]
    assert len(units) and torch.equal(out[:, units], torch.zeros_like(out[:, units]))


def test_a_unit_summed_with_a_shortcut_is_silenced_in_its_own_output_only(knockout):
    """Pre-activation residual (ResNetV2): conv2's output is added to the shortcut before the next
    BatchNorm. Zeroing that norm's channel would silence the shortcut too, so it is left alone."""

    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            x = x + self.conv2(torch.relu(self.conv1(x)))
            return self.head(torch.relu(self.bn(x)).mean((2, 3)))

    model = randomise_norms(PreAct())
    x = torch.randn(2, 4, 6, 6)
    conv2 = ModelGraph.of(model, x[:1]).layers[1]
    assert conv2.name == "conv2" and conv2.norms == ()
    with perturbed(conv2, knockout, 0.5, generator_for(0)):
        units = silenced_units(conv2)
        out = outputs_of(model, [model.conv2], x)[0][0]
        summed = outputs_of(model, [model.bn], x)[0][0]
    assert torch.equal(out[:, units], torch.zeros_like(out[:, units]))
    assert (summed[:, units] != 0).any()  # the shortcut still flows through those channels


# ---------------------------------------------------------------- a representative subset of the zoo


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, options",
    [
        ("resnet18d", {}),  # ResNet-D: an avg-pool shortcut starts upstream of the previous cut
        ("densenet", {}),  # concatenations: every layer's cut carries the block's features so far
        ("convnext_atto", {}),  # layer scale, channels-last LayerNorm, permutes
        ("dpn48b", {"k_sec": (1, 2, 1, 1)}),  # tuples of (residual, dense) paths between blocks
        ("repvgg_a0", {}),  # three parallel branches summed, not re-parameterised
        ("levit_128s", {"img_size": 32}),  # attention with Linear + BatchNorm1d and attention biases
    ],
)
def test_fast_engine_equals_naive_on_the_zoo(name, options, tmp_path):
    """Random weights made non-trivial (no zero-initialised branch, layer scale near 1): the fast
    engine's losses equal the naive loop's for 4 layers spread over the network's depth."""
    torch.manual_seed(0)
    build = small_densenet if name == "densenet" else lambda **kw: timm.create_model(name, **kw)
    model = randomise_norms(build(num_classes=5, **options))
    log = fast_and_naive(model, torch.randn(4, 3, 32, 32), torch.arange(4) % 5, tmp_path, layer_count=4)
    assert "full passes" not in log
