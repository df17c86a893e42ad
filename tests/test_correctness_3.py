"""Right numbers on the third round of correctness cases (issue #23, item 1).

Each model is copied from the project's correctness cases (``correctness_cases_3.py``) and built
as they build it (seed 0, norm statistics and biases made non-trivial). The right values come from
**oracles written here, independently of the code under test**: node knockout at p = 1 must equal
the model evaluated with forward hooks that zero the layer's output and the output of every
per-channel norm the layer feeds (the documented definition); a layer's synapse knockout at p = 1
must equal the model with that layer's effective weight replaced by zeros; a run must leave every
parameter, buffer and flag as it found them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from case_models import CaseSource, case_plugins
from conftest import write_fashion
from lesionbench.api import run
from lesionbench.errors import LesionbenchError
from lesionbench.graph import ModelGraph

KEY = ["model", "layer", "perturbation", "level", "draw"]


def _nontrivial(norm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(torch.rand(norm.running_mean.shape, generator=g))
            norm.running_var.copy_(0.5 + torch.rand(norm.running_var.shape, generator=g))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.5 + torch.rand(norm.bias.shape, generator=g))


# ------------------------------------------------------------------------------------ the cases


class _ConvFcHead(nn.Module):
    """conv ``c1`` (1 -> 8, stride 2), ReLU, flatten, the case's ``fc`` (8·14·14 -> 64 units), tanh, linear
    ``head`` (64 -> 10); ``make_fc`` builds the fc layer between the conv and the head (the seeded order)."""

    def __init__(self, make_fc):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc = make_fc()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(F.relu(self.c1(x)).flatten(1))))


class HFConv1D(_ConvFcHead):
    """transformers' Conv1D (GPT-2, ImageGPT): a linear layer whose weight is stored [in, out]."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__(lambda: Conv1D(64, 8 * 14 * 14))


class CatEmpty(nn.Module):
    """Features accumulated onto a (0,)-shaped tensor, as torch.cat allows (and HF KV caches start)."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(1, 4, k, stride=2, padding=k // 2) for k in (1, 3, 5)])
        self.head = nn.Linear(12 * 14 * 14, 10)

    def forward(self, x):
        feats = torch.empty(0, device=x.device, dtype=x.dtype)
        for conv in self.branches:
            feats = torch.cat([feats, F.relu(conv(x))], dim=1)
        return self.head(feats.flatten(1))


class ConvGN(nn.Module):
    """conv -> GroupNorm (per-channel affine after group statistics)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        _nontrivial(self.norm)
        self.head = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        return self.head(F.relu(self.norm(self.c1(x))).flatten(1))


class TransposeBN(nn.Module):
    """Linear on tokens -> transpose -> BatchNorm1d over the Linear's output features."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 16, 7, stride=7)
        self.fc = nn.Linear(16, 24)
        self.bn = nn.BatchNorm1d(24)
        _nontrivial(self.bn)
        self.head = nn.Linear(24 * 16, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        h = self.fc(t).transpose(1, 2)
        return self.head(F.relu(self.bn(h)).flatten(1))


class _QATBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc, self.head = nn.Linear(8 * 14 * 14, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.quant(x)
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.dequant(self.head(F.relu(self.fc(x.flatten(1)))))


def QATFakeQuant(frozen=False):
    """Eager-mode QAT model after prepare_qat and some training batches: observers still enabled
    (``frozen``: switched off with PyTorch's own ``disable_observer``, the oracle)."""
    m = _QATBase().train()
    m.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    torch.ao.quantization.prepare_qat(m, inplace=True)
    with torch.no_grad():
        for s in range(4):
            m(torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(s)))
    if frozen:
        m.apply(torch.ao.quantization.disable_observer)
    BUILT["QATFakeQuant"] = m
    return m.eval()


# -- variants of the norm cases (not handed): flatten into BatchNorm1d, permute into LayerNorm,
# InstanceNorm(affine), a weight-standardised conv into GroupNorm, RMSNorm on tokens


class FlatBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.head = (
            nn.Conv2d(1, 4, 3, stride=4, padding=1),
            nn.BatchNorm1d(4 * 7 * 7),
            nn.Linear(196, 10),
        )
        _nontrivial(self.bn)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.c1(x).flatten(1))))


class PermuteLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.ln, self.head = nn.Conv2d(1, 8, 7, stride=7), nn.LayerNorm(8), nn.Linear(8 * 16, 10)
        _nontrivial(self.ln)

    def forward(self, x):
        return self.head(self.ln(self.c1(x).permute(0, 2, 3, 1)).flatten(1))


class ConvIN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.head = nn.Linear(8 * 196, 10)
        _nontrivial(self.n)

    def forward(self, x):
        return self.head(F.gelu(self.n(self.c1(x))).flatten(1))


class StdConv(nn.Conv2d):
    """A weight-standardised conv (BiT's StdConv): the weight is normalised per filter at every call."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class StdConvGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n, self.head = StdConv(1, 8, 3, stride=2, padding=1), nn.GroupNorm(4, 8), nn.Linear(8 * 196, 10)
        _nontrivial(self.n)

    def forward(self, x):
        return self.head(F.relu(self.n(self.c1(x))).flatten(1))


class TokensRMS(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.n = nn.Conv2d(1, 16, 7, stride=7), nn.Linear(16, 24), nn.RMSNorm(24)
        self.head = nn.Linear(24 * 16, 10)
        with torch.no_grad():
            self.n.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.head(self.n(self.fc(self.embed(x).flatten(2).transpose(1, 2))).flatten(1))


class MHAAct(nn.Module):
    """Attention whose out_proj weight is read by F.multi_head_attention_forward: never called as a module."""

    def __init__(self, out_proj_silenced: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(1, 16, 7, stride=7)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16 * 16, 10)
        self.out_proj_silenced = out_proj_silenced  # the oracle: out_proj's output (the attention's) is zero

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        a = torch.zeros_like(t) if self.out_proj_silenced else self.attn(t, t, t, need_weights=False)[0]
        return self.head((t + a).flatten(1))


class MatmulWeight(nn.Module):
    """A layer whose weight is applied by ``x @ fc.weight.T``: no op whose output a forward hook can stand for."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc, self.head = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Linear(8 * 196, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.tanh(F.relu(self.c1(x)).flatten(1) @ self.fc.weight.T + self.fc.bias))


class ForwardCall(nn.Module):
    """A variant: a layer called as ``.forward()`` (forward hooks never run) and one through F.linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc, self.head = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Linear(8 * 196, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = torch.tanh(self.fc.forward(F.relu(self.c1(x)).flatten(1)))
        return F.linear(h, self.head.weight, self.head.bias)


class LoraLinear(nn.Module):
    """peft's layout: base_layer + lora_A / lora_B, y = base(x) + s * B(A(x)); a trained (non-zero) adapter."""

    def __init__(self, base, r=4, alpha=8):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.5)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling


class LoRA(_ConvFcHead):
    def __init__(self):
        super().__init__(lambda: LoraLinear(nn.Linear(8 * 14 * 14, 64)))


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 14 * 14, 10)
        _nontrivial(self.bn)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.c1(x))).flatten(1))


def DynQuant():
    """torch.ao dynamic quantization of every Linear (packed int8 weights)."""
    return torch.ao.quantization.quantize_dynamic(_Plain().eval(), {nn.Linear}, dtype=torch.qint8)


def Scripted():
    return torch.jit.script(_Plain().eval())


def AllPruned():
    """A variant: every layer carries a torch.nn.utils.prune mask."""
    model = _Plain()
    for name in ("c1", "head"):
        prune.l1_unstructured(model.get_submodule(name), "weight", amount=0.3)
    return model


BUILT: dict[str, nn.Module] = {}  # the last model built of each case, to check it is left as it was
ARCHS = {
    f.__name__: f
    for f in (
        HFConv1D,
        CatEmpty,
        ConvGN,
        TransposeBN,
        QATFakeQuant,
        MHAAct,
        ForwardCall,
        LoRA,
        DynQuant,
        Scripted,
        AllPruned,
        MatmulWeight,
    )
}


# ------------------------------------------------------------------------------------ harness


def silence(model: nn.Module, names: list[str]) -> nn.Module:
    """The oracle of node knockout at p = 1: every named module's output replaced by zeros."""
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    return model


class Source(CaseSource):
    """The cases as model plugin ``case3:NAME``; option ``silence`` applies the oracle above."""

    def own_options(self, options):
        silenced = list(options.pop("silence", []))
        return lambda module: silence(module, silenced)


PLUGINS = case_plugins(
    Source("case3", "correctness cases, third round", ARCHS, "repro3-grey28", num_classes=10)
)  # beside the built-ins in conftest's registry fixture
STUDY_DEFAULTS = {"name": "case3"}  # conftest's study fixture: draws 1, 40 images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fashion") / "fashion", n=40)


def fast_and_naive(spec: dict, registry) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames = [
        run(spec | {"engine": e}, registry=registry).sort_values(KEY, ignore_index=True) for e in ("fast", "naive")
    ]
    return frames[0], frames[1]


def clean_loss(study, arch: str, data, registry, **options) -> float:
    """The loss of the case's model (with ``options``, e.g. the silencing oracle), undamaged."""
    df = run(
        study({"ref": f"case3:{arch}", "options": options}, [], "synapse_knockout", [0.0], data), registry=registry
    )
    return float(df.loc[df["perturbation"] == "clean", "loss"].iloc[0])


def loss_at(df: pd.DataFrame, perturbation: str, level: float, layer: str | None = None) -> np.ndarray:
    rows = df[(df["perturbation"] == perturbation) & (df["level"] == level)]
    return rows[rows["layer"] == layer]["loss"].to_numpy() if layer else rows["loss"].to_numpy()


# ------------------------------------------------------------------------------------ Conv1D


def test_transformers_conv1d_is_a_layer_whose_units_are_the_weight_columns(study, data, registry):
    pytest.importorskip("transformers")
    graph = ModelGraph.of(HFConv1D().eval(), torch.zeros(1, 1, 28, 28))
    fc = next(l for l in graph.layers if l.name == "fc")
    assert [l.name for l in graph.layers] == ["c1", "fc", "head"] and not graph.left_out
    assert fc.out_units == 64 and fc.kind == "linear"  # weight [1568, 64]: 64 columns, one per unit
    spec = study(
        "case3:HFConv1D", ["fc"], ["node_knockout", "filter_prune", "synapse_knockout"], [0.0, 0.5, 1.0], data, draws=2
    )
    fast, naive = fast_and_naive(spec, registry)
    np.testing.assert_allclose(fast["loss"], naive["loss"], rtol=1e-6)
    silenced = clean_loss(study, "HFConv1D", data, registry, silence=["fc"])  # the oracle: fc emits zeros
    for perturbation in ("node_knockout", "filter_prune", "synapse_knockout"):
        np.testing.assert_allclose(loss_at(fast, perturbation, 1.0), silenced, rtol=1e-6)
    clean = clean_loss(study, "HFConv1D", data, registry)
    assert (loss_at(fast, "node_knockout", 0.5) != clean).all()  # half the columns silenced changes the output


def test_conv1d_node_knockout_zeroes_whole_columns():
    pytest.importorskip("transformers")
    from lesionbench.plugins.node_knockout import silence_units

    model = HFConv1D().eval()
    layer = next(l for l in ModelGraph.of(model, torch.zeros(1, 1, 28, 28)).layers if l.name == "fc")
    with torch.no_grad():
        silence_units(layer, torch.tensor([3, 7]))
        out = model.fc(torch.randn(5, 8 * 14 * 14))
    assert (out[:, [3, 7]] == 0).all() and (out[:, [0, 1, 2, 4]] != 0).all()
    assert (model.fc.weight[:, [3, 7]] == 0).all() and (model.fc.weight[[3, 7], :] != 0).any()


# ------------------------------------------------------------------------------------ cat with (0,)


def test_cat_onto_an_empty_tensor_runs_and_units_keep_their_offsets(study, data, registry):
    graph = ModelGraph.of(CatEmpty().eval(), torch.zeros(1, 1, 28, 28))
    assert [l.name for l in graph.layers] == ["branches.0", "branches.1", "branches.2", "head"]
    fast, naive = fast_and_naive(study("case3:CatEmpty", [], "synapse_knockout", [0.0, 1.0], data), registry)
    np.testing.assert_allclose(fast["loss"], naive["loss"], rtol=1e-6)
    assert fast["error"].eq("").all()


def test_an_internal_failure_is_reported_as_lesionbench_s_not_the_plugin_s(study, data, registry, monkeypatch):
    import lesionbench.unit_spans as unit_spans

    def broken(*_args, **_kwargs):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(unit_spans, "follow_units", broken)  # the probe calls it through its module
    with pytest.raises(LesionbenchError) as info:
        run(study("case3:CatEmpty", [], "synapse_knockout", [0.0], data), registry=registry)
    message = str(info.value)
    assert message.startswith("lesionbench failed while analysing the layers of model 'case3:CatEmpty'")
    assert "bug in lesionbench" in message and "plugin 'case3'" not in message


# ------------------------------------------------------------------------------------ norms a unit feeds


@pytest.mark.parametrize(("arch", "layer", "norm"), [("ConvGN", "c1", "norm"), ("TransposeBN", "fc", "bn")])
def test_node_knockout_silences_the_unit_after_the_norm_it_feeds(study, data, registry, arch, layer, norm):
    spec = study(f"case3:{arch}", [layer], ["node_knockout", "filter_prune", "synapse_knockout"], [0.0, 1.0], data)
    fast, naive = fast_and_naive(spec, registry)
    np.testing.assert_allclose(fast["loss"], naive["loss"], rtol=1e-6)
    oracle = clean_loss(study, arch, data, registry, silence=[layer, norm])  # zero at the layer and after its norm
    for perturbation in ("node_knockout", "filter_prune"):
        np.testing.assert_allclose(loss_at(fast, perturbation, 1.0), oracle, rtol=1e-6)
    assert not np.allclose(loss_at(fast, "synapse_knockout", 1.0), oracle)  # the norm's shift alone differs


@pytest.mark.parametrize(
    ("cls", "layer", "norm"),
    [
        (ConvGN, "c1", "norm"),
        (TransposeBN, "fc", "bn"),
        (FlatBN, "c1", "bn"),
        (PermuteLN, "c1", "ln"),
        (ConvIN, "c1", "n"),
        (StdConvGN, "c1", "n"),
        (TokensRMS, "fc", "n"),
    ],
)
def test_silenced_units_stay_silent_through_every_per_channel_norm(cls, layer, norm):
    from lesionbench.plugins.node_knockout import silence_units

    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = cls().eval()
    found = next(l for l in ModelGraph.of(model, torch.zeros(1, 1, 28, 28)).layers if l.name == layer)
    assert found.norm_names == (norm,)
    units = torch.tensor([1, 3])
    torch.manual_seed(0)
    oracle = cls().eval()  # the same weights; units 1 and 3 zeroed where they leave the layer and the norm
    zero_units = lambda out: out.index_fill(1 if isinstance(oracle.get_submodule(layer), nn.Conv2d) else -1, units, 0)  # noqa: E731
    oracle.get_submodule(layer).register_forward_hook(lambda _m, _i, out: zero_units(out))
    with torch.no_grad():
        n_out = oracle.get_submodule(layer)(
            torch.zeros(1, 1, 28, 28) if layer == "c1" else torch.zeros(1, 16, 16)
        ).shape
        silence_units(found, units)
        got = model(x)
        silent = torch.zeros(n_out, dtype=torch.bool).index_fill(1 if layer == "c1" else -1, units, True)
        mask = {}

        def after_norm(_m, _i, out):  # the norm's output at the silenced units' positions, zeroed
            where = mask.setdefault("m", _positions(silent, out.shape))
            return out.masked_fill(where, 0)

        oracle.get_submodule(norm).register_forward_hook(after_norm)
        want = oracle(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _positions(silent: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Where the silenced units of a one-image layer output land in a norm's input of ``shape``
    (after the model's transpose / permute / flatten), found by sending the mask through the same
    reshaping the model applies: here, by matching element counts and the order of the layouts."""
    flat = silent[0]
    if flat.dim() == 3 and len(shape) == 2:  # conv [C, H, W] flattened
        return flat.reshape(1, -1).expand(shape[0], -1)
    if flat.dim() == 3 and len(shape) == 4 and shape[-1] == flat.shape[0]:  # conv [C, H, W] permuted to [H, W, C]
        return flat.permute(1, 2, 0).unsqueeze(0).expand(shape)
    if flat.dim() == 3:
        return flat.unsqueeze(0).expand(shape)
    if flat.dim() == 2 and shape[-1] == flat.shape[-1]:  # tokens [T, F]
        return flat.unsqueeze(0).expand(shape)
    return flat.transpose(0, 1).unsqueeze(0).expand(shape)  # tokens transposed to [F, T]


# ------------------------------------------------------------------------------------ QAT observers


def test_qat_observers_do_not_move_and_the_model_comes_back_bit_identical(study, data, registry):
    spec = study("case3:QATFakeQuant", [], ["synapse_knockout", "node_knockout"], [0.0, 0.5, 1.0], data)
    frames = []
    for engine in ("fast", "naive"):
        df = run(spec | {"engine": engine}, registry=registry).sort_values(KEY, ignore_index=True)
        model = BUILT["QATFakeQuant"]
        torch.manual_seed(0)
        before = QATFakeQuant()  # the same model, never evaluated by lesionbench
        after = model.state_dict()
        assert after.keys() == before.state_dict().keys()
        for key, value in before.state_dict().items():
            assert torch.equal(value, after[key]), key  # observers' min/max, scales, flags: as built
        assert [m.training for m in model.modules()] == [m.training for m in before.modules()]
        frames.append(df)
    np.testing.assert_array_equal(frames[0]["loss"], frames[1]["loss"])  # order of evaluation does not matter
    oracle = clean_loss(study, "QATFakeQuant", data, registry, frozen=True)  # observers off by PyTorch's own switch
    assert float(frames[0].loc[frames[0]["perturbation"] == "clean", "loss"].iloc[0]) == oracle


# ------------------------------------------------------------------------------------ hook perturbations


HOOK_LEVELS = {"activation_knockout": [0.0, 1.0], "activation_noise": [0.0, 2.0], "activation_bit_flip": [0.0, 0.1]}
HOOKS = list(HOOK_LEVELS)


def hooks_damage_alike_on_both_engines(spec: dict, registry) -> pd.DataFrame:
    """The fast engine's results of ``spec``, after checking that its losses equal the naive engine's and
    that each hook perturbation at its highest level of ``HOOK_LEVELS`` changes every cell's loss."""
    fast, naive = fast_and_naive(spec, registry)
    np.testing.assert_allclose(fast["loss"], naive["loss"], rtol=1e-6)
    clean = float(fast.loc[fast["perturbation"] == "clean", "loss"].iloc[0])
    for perturbation, levels in HOOK_LEVELS.items():
        assert (loss_at(fast, perturbation, levels[-1]) != clean).all(), perturbation
    return fast


def test_hook_perturbations_refuse_by_name_a_layer_their_hook_cannot_see(study, data, registry):
    for perturbation in HOOKS:
        with pytest.raises(
            LesionbenchError,
            match=r"layer 'fc' of model 'case3:MatmulWeight': its weight is "
            r"applied by '\w+' outside the module's own call",
        ):
            run(study("case3:MatmulWeight", ["fc"], perturbation, [0.0, 1.0], data), registry=registry)


def test_hook_perturbations_damage_multihead_attention_out_proj(study, data, registry):
    """``out_proj`` is applied inside ``F.multi_head_attention_forward``; the harness calls it there."""
    spec = study("case3:MHAAct", ["attn.out_proj"], HOOKS, [0.0], data)
    spec["levels"] = dict(HOOK_LEVELS)
    fast = hooks_damage_alike_on_both_engines(spec, registry)
    oracle = clean_loss(study, "MHAAct", data, registry, out_proj_silenced=True)
    np.testing.assert_allclose(loss_at(fast, "activation_knockout", 1.0), oracle, rtol=1e-6)


def test_hook_perturbations_damage_a_layer_called_as_forward_or_through_f_linear(study, data, registry):
    graph = ModelGraph.of(ForwardCall().eval(), torch.zeros(1, 1, 28, 28))
    assert {l.name: l.applied_by for l in graph.layers} == {"c1": "", "fc": "linear", "head": "linear"}
    spec = study("case3:ForwardCall", ["fc", "head"], HOOKS + ["synapse_knockout"], [0.0, 1.0], data)
    spec["levels"] = HOOK_LEVELS | {"synapse_knockout": [0.0, 1.0]}
    fast = hooks_damage_alike_on_both_engines(spec, registry)
    # oracles: all of head's units zeroed -> logits 0 -> loss ln 10; fc's -> tanh(0) = 0 -> logits = head's bias
    np.testing.assert_allclose(loss_at(fast, "activation_knockout", 1.0, "head"), np.log(10), rtol=1e-6)
    torch.manual_seed(0)
    bias = ForwardCall().head.bias.detach()
    labels = torch.arange(40) % 10  # write_fashion's labels, every image
    expected = float(F.cross_entropy(bias.expand(40, 10), labels))
    np.testing.assert_allclose(loss_at(fast, "activation_knockout", 1.0, "fc"), expected, rtol=1e-5)
    np.testing.assert_allclose(loss_at(fast, "synapse_knockout", 1.0, "fc"), expected, rtol=1e-5)


def test_lesioned_refuses_a_hook_perturbation_on_a_layer_its_hook_cannot_see():
    from lesionbench.api import lesioned

    model = MatmulWeight().eval()
    with pytest.raises(LesionbenchError, match="outside the module's own call"):
        with lesioned(model, "fc", "activation_noise", 1.0, example=torch.zeros(1, 1, 28, 28)):
            pass


def test_lesioned_damages_multihead_attention_out_proj_and_restores_it():
    from lesionbench.api import lesioned

    torch.manual_seed(0)
    model, x = MHAAct().eval(), torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        clean = model(x)
        with lesioned(model, "attn.out_proj", "activation_knockout", 1.0, example=x[:1]):
            damaged = model(x)
        silenced = MHAAct(out_proj_silenced=True).eval()
        silenced.load_state_dict(model.state_dict())
        torch.testing.assert_close(damaged, silenced(x), rtol=1e-5, atol=1e-6)
        assert torch.equal(model(x), clean)


def test_hook_perturbations_leave_out_unseen_layers_and_say_so_in_run_log(study, data, registry, tmp_path):
    df = run(
        study("case3:MatmulWeight", [], ["activation_knockout", "synapse_knockout"], [0.0, 1.0], data),
        tmp_path / "r",
        registry=registry,
    )
    hooked = df[df["perturbation"] == "activation_knockout"]
    assert set(hooked["layer"]) == {"c1", "head"}  # never a row scoring fc as perfectly robust
    assert "fc" in set(df[df["perturbation"] == "synapse_knockout"]["layer"])
    log = (tmp_path / "r" / "run.log").read_text()
    assert "'fc' of model 'case3:MatmulWeight': its weight is applied by" in log
    assert "left out of activation_knockout" in log
    clean = float(df.loc[df["perturbation"] == "clean", "loss"].iloc[0])
    assert (loss_at(df, "activation_knockout", 1.0) != clean).all()  # every hooked row is damaged


# ------------------------------------------------------------------------------------ LoRA


def test_a_lora_wrapped_layer_is_one_layer_damaged_through_its_effective_weight(study, data, registry):
    graph = ModelGraph.of(LoRA().eval(), torch.zeros(1, 1, 28, 28))
    assert [l.name for l in graph.layers] == ["c1", "fc.base_layer", "head"]
    assert {"fc.lora_A.default", "fc.lora_B.default"} <= set(graph.left_out)
    perturbations = ["node_knockout", "synapse_knockout", "filter_prune", "activation_knockout"]
    fast, naive = fast_and_naive(study("case3:LoRA", ["fc.base_layer"], perturbations, [0.0, 0.5, 1.0], data), registry)
    np.testing.assert_allclose(fast["loss"], naive["loss"], rtol=1e-6)
    oracle = clean_loss(study, "LoRA", data, registry, silence=["fc"])  # the wrapper's output (base + s·B·A) zeroed
    for perturbation in perturbations:
        np.testing.assert_allclose(loss_at(fast, perturbation, 1.0), oracle, rtol=1e-6)
    model, x = LoRA().eval(), torch.randn(2, 1, 28, 28)
    layer = next(l for l in ModelGraph.of(model, torch.zeros(1, 1, 28, 28)).layers if l.name == "fc.base_layer")
    with torch.no_grad():
        before = model(x)
        layer.merge_adapters()  # the effective weight, independently: W + s·B·A computes the same function
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
        assert (model.fc.lora_B["default"].weight == 0).all()


# ------------------------------------------------------------------------------------ left out, refused


def test_a_dynamically_quantised_linear_is_named_in_run_log(study, data, registry, tmp_path):
    df = run(study("case3:DynQuant", [], "synapse_knockout", [0.0, 1.0], data), tmp_path / "r", registry=registry)
    assert set(df["layer"]) == {"", "c1"}
    log = (tmp_path / "r" / "run.log").read_text()
    assert "case3:DynQuant: head left out: a quantized torch.ao.nn.quantized.dynamic" in log and "packed" in log


def test_weights_read_that_are_no_layer_s_are_named(study, data, registry, tmp_path):
    run(study("case3:MHAAct", [], "synapse_knockout", [0.0], data), tmp_path / "r", registry=registry)
    log = (tmp_path / "r" / "run.log").read_text()
    assert (
        "attn.in_proj_weight left out: a weight of MultiheadAttention that 'multi_head_attention_forward' reads" in log
    )


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("Scripted", r"is a TorchScript module .* which lesionbench does not support"),
        (
            "AllPruned",
            r"has no layer lesionbench can perturb \(c1: its weight is recomputed as weight_orig × weight_mask "
            r"by torch.nn.utils.prune.*; head: ",
        ),
    ],
)
def test_unsupported_models_are_refused_with_the_reason(study, data, registry, tmp_path, arch, message):
    with pytest.raises(LesionbenchError, match=message):
        run(study(f"case3:{arch}", [], "synapse_knockout", [0.0, 1.0], data), tmp_path / "r", registry=registry)
    assert not (tmp_path / "r").exists()


class ConvLora(nn.Module):
    """A variant: peft's conv LoRA (A: a conv like the base's, B: 1×1), two adapters, scaling by name."""

    def __init__(self):
        super().__init__()
        self.base_layer = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.lora_A = nn.ModuleDict({k: nn.Conv2d(1, 2, 3, stride=2, padding=1, bias=False) for k in ("a", "b")})
        self.lora_B = nn.ModuleDict({k: nn.Conv2d(2, 8, 1, bias=False) for k in ("a", "b")})
        for b in self.lora_B.values():
            nn.init.normal_(b.weight)
        self.scaling = {"a": 1.5, "b": 0.5}

    def forward(self, x):
        out = self.base_layer(x)
        for k in ("a", "b"):
            out = out + self.lora_B[k](self.lora_A[k](x)) * self.scaling[k]
        return out


class ConvLoraPoolBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.head = ConvLora(), nn.BatchNorm1d(8), nn.Linear(8, 10)
        _nontrivial(self.bn)

    def forward(self, x):
        return self.head(self.bn(F.relu(self.c(x)).mean((2, 3))))


def test_a_conv_lora_layer_is_silenced_through_its_adapters_and_the_norm_after_pooling():
    from lesionbench.plugins.node_knockout import silence_units

    torch.manual_seed(0)
    model, x = ConvLoraPoolBN().eval(), torch.randn(3, 1, 28, 28)
    graph = ModelGraph.of(model, torch.zeros(1, 1, 28, 28))
    assert [l.name for l in graph.layers] == ["c.base_layer", "head"]
    layer = graph.layers[0]
    assert layer.norm_names == ("bn",)  # the wrapper's output (base + adapters), mean-pooled, into bn
    with torch.no_grad():
        before = model(x)
        layer.merge_adapters()
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
        silence_units(layer, torch.arange(8))
        torch.testing.assert_close(model(x), model.head.bias.expand(3, 10))  # every unit silent after bn
