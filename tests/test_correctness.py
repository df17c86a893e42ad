"""Right numbers on models written the way real code is written (issue #14).

Each class below is a small model on which lesionbench once gave a silently wrong number, crashed
or refused a valid model (the models are copied from the project's correctness cases; the expected
values are the cases' right values, measured on the real Fashion-MNIST test images). Every kind of
fault has a test that fails if the fault comes back: in-place ops that hide a dependency from the
fast engine, BatchNorm recalibration on a cached branch, ties through shared storage,
parametrized weights, the norm a unit feeds through an activation, layers used without being
called, tuple outputs, half precision, the class count, and the bit-flip count's distribution.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from case_models import CaseSource, case_plugins
from conftest import needs_fashion_mnist, write_fashion
from lesionbench.api import run
from lesionbench.errors import LesionbenchError
from lesionbench.graph import ModelGraph, discover_layers
from lesionbench.perturbation import binomial_count, generator_for
from lesionbench.registry import create_registry

needs_fashion = needs_fashion_mnist()
KEY = ["model", "layer", "perturbation", "level", "draw"]


class InplaceStmt(nn.Module):  # in-place residual written as a statement
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x.add_(self.c2(x))
        return self.head(F.relu(x).flatten(1))


class TiedStorage(nn.Module):  # b.weight: another Parameter over a.weight's memory
    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.head = (
            nn.Linear(784, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 10),
        )
        self.b.weight = nn.Parameter(self.a.weight.data)

    def forward(self, x):
        x = torch.tanh(self.inp(x.flatten(1)))
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class WeightNorm(nn.Module):  # parametrized weight
    def __init__(self):
        super().__init__()
        self.c1 = nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 8, 3, stride=2, padding=1))
        self.fc = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c1(x)).flatten(1))


class ReluBN(nn.Module):  # conv -> ReLU -> BatchNorm
    def __init__(self, inplace=False):
        super().__init__()
        self.c1, self.act, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 14 * 14, 10)
        self.bn.running_mean.fill_(0.5)
        self.bn.bias.data.fill_(1.0)  # "trained" statistics

    def forward(self, x):
        return self.head(F.max_pool2d(self.bn(self.act(self.c1(x))), 2).flatten(1))


class MHA(nn.Module):  # attention block from torch.nn
    def __init__(self):
        super().__init__()
        self.stem, self.attn = nn.Conv2d(1, 16, 7, stride=7), nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(t, t, t, need_weights=False)[0].mean(1))


class TupleOut(nn.Module):  # (logits, features)
    def __init__(self):
        super().__init__()
        self.c1, self.head = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        f = F.relu(self.c1(x)).flatten(1)
        return self.head(f), f


class DeclOrder(nn.Module):  # classifier declared before a smaller Linear
    def __init__(self):
        super().__init__()
        self.head, self.c1 = nn.Linear(4, 10), nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8 * 14 * 14, 4)

    def forward(self, x):
        return self.head(F.relu(self.proj(F.relu(self.c1(x)).flatten(1))))


class DictOut(nn.Module):  # Hugging Face style: {"logits": ...}
    def __init__(self):
        super().__init__()
        self.c1, self.head = nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        return {"features": x, "logits": self.head(F.relu(self.c1(x)).flatten(1))}


class SetOut(nn.Module):  # returns something that holds no class scores
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return {"features": self.c1(x)}


class SharedConv(nn.Module):  # one conv used twice, each use into its own BatchNorm
    def __init__(self):
        super().__init__()
        self.c, self.bn_a, self.bn_b = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 2, 10)
        for bn in (self.bn_a, self.bn_b):
            bn.bias.data.fill_(0.7)

    def forward(self, x):
        a = self.bn_a(F.relu(self.c(x))).mean((2, 3))
        b = self.bn_b(F.gelu(self.c(x.flip(-1)))).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


class ViewInplace(nn.Module):  # writes in place into a view of a tensor read later
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Linear(784, 16), nn.Linear(8, 8), nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x.flatten(1)))
        h[:, :8].add_(self.c2(h[:, 8:]))
        return self.head(h)


ARCHS = {
    c.__name__: c
    for c in (
        InplaceStmt,
        TiedStorage,
        WeightNorm,
        ReluBN,
        MHA,
        TupleOut,
        DeclOrder,
        DictOut,
        SetOut,
        SharedConv,
        ViewInplace,
    )
}


class Source(CaseSource):
    """The cases as model plugin ``repro:NAME``, as the correctness cases build them (seed 0); option
    ``dtype`` (a torch dtype's name) converts the built model."""

    def own_options(self, options):
        dtype = options.pop("dtype", None)
        return (lambda module: module.to(getattr(torch, dtype))) if dtype else (lambda module: module)


PLUGINS = case_plugins(Source("repro", "minimal reproductions of silent errors", ARCHS, "grey28"))
STUDY_DEFAULTS = {"name": "case", "draws": 2, "n_images": 64}  # conftest's study fixture


def fast_and_naive(spec: dict, registry) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames = [
        run(spec | {"engine": e}, registry=registry).sort_values(KEY, ignore_index=True) for e in ("fast", "naive")
    ]
    return frames[0], frames[1]


def damaged(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["perturbation"] != "clean") & (df["level"] > 0)]


# ------------------------------------------------------------------------------------ 1. in-place


@needs_fashion
def test_in_place_statement_keeps_its_dependency_in_the_fast_engine(study, registry):
    fast, naive = fast_and_naive(study("repro:InplaceStmt", ["c2"], "synapse_knockout", [0.0, 0.5]), registry)
    np.testing.assert_allclose(damaged(fast)["loss"], damaged(naive)["loss"], rtol=1e-6)
    assert list(damaged(naive)["loss"].round(4)) == [2.3099, 2.3243]  # the case's right values
    assert damaged(fast)["loss"].nunique() == 2  # not the clean network's output for every draw


def test_in_place_write_into_a_view_falls_back_to_full_passes_and_says_so(study, tmp_path, registry):
    data = write_fashion(tmp_path / "fashion", n=40)
    spec = study("repro:ViewInplace", ["c2"], "weight_noise", [0.0, 1.0], n_images=40, data=data)
    fast, naive = fast_and_naive(spec, registry)
    np.testing.assert_allclose(damaged(fast)["loss"], damaged(naive)["loss"], rtol=1e-6)
    assert damaged(fast)["loss"].nunique() == 2
    graph = ModelGraph.of(ViewInplace().eval(), torch.zeros(1, 1, 28, 28))
    assert graph.fx is None and "writes in place into a view" in graph.untraceable
    run(spec, tmp_path / "run", registry=registry)
    assert "writes in place into a view" in (tmp_path / "run" / "run.log").read_text()


# ------------------------------------------------------------------------------------ 2. BN recalibration


@needs_fashion
def test_bn_recalibration_on_a_cached_shortcut_equals_the_naive_engine(study):
    layers = ["layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1"]  # main-path convs of downsampling blocks
    spec = study(
        "fashion_resnet",
        layers,
        "synapse_knockout",
        [0.0, 0.5],
        n_images=100,
        bn_recalibrate=True,
        calibration_images=100,
    )
    fast, naive = fast_and_naive(spec, create_registry())
    np.testing.assert_allclose(damaged(fast)["loss"], damaged(naive)["loss"], rtol=1e-5)
    np.testing.assert_array_equal(damaged(fast)["top1"], damaged(naive)["top1"])


def test_only_the_batchnorms_the_damage_reaches_are_recalibrated():
    import timm

    model = timm.create_model("resnet18", num_classes=10).eval()
    graph = ModelGraph.of(model, torch.zeros(1, 3, 32, 32))
    names = {m: n for n, m in model.named_modules()}
    layer = next(l for l in graph.layers if l.name == "layer2.0.conv1")
    reached = {names[m] for m in graph.norms_reached(layer)}
    assert "layer2.0.bn1" in reached and "layer2.0.bn2" in reached and "layer4.1.bn2" in reached
    assert "layer2.0.downsample.1" not in reached  # the shortcut does not see conv1's damage
    assert "layer1.1.bn2" not in reached and "bn1" not in reached  # upstream


# ------------------------------------------------------------------------------------ 3. ties by storage


@needs_fashion
def test_parameters_sharing_storage_are_a_tie(study, registry):
    fast, naive = fast_and_naive(study("repro:TiedStorage", ["b"], "synapse_knockout", [0.0, 0.5]), registry)
    np.testing.assert_allclose(damaged(fast)["loss"], damaged(naive)["loss"], rtol=1e-6)
    assert list(damaged(naive)["loss"].round(4))[:1] == [2.3218]  # the case's right value (first draw)
    model = TiedStorage().eval()
    graph = ModelGraph.of(model, torch.zeros(1, 1, 28, 28))
    assert graph.split(next(l for l in graph.layers if l.name == "b")) is None  # a's output cannot be cached


# ------------------------------------------------------------------------------------ 4. parametrized


def test_parametrized_weight_is_refused_by_name_and_left_out_otherwise(study, tmp_path, registry):
    data = write_fashion(tmp_path / "fashion", n=40)
    with pytest.raises(
        LesionbenchError, match=r"layer 'c1' of model 'repro:WeightNorm' cannot be perturbed: .*parametrization"
    ):
        run(
            study("repro:WeightNorm", ["c1"], "synapse_knockout", [0.0, 1.0], n_images=40, data=data), registry=registry
        )
    out = tmp_path / "run"
    df = run(
        study("repro:WeightNorm", [], "synapse_knockout", [0.0, 1.0], n_images=40, data=data), out, registry=registry
    )
    assert set(df["layer"]) == {"", "fc"}
    assert "c1 left out: its weight is computed by a parametrization" in (out / "run.log").read_text()


# ------------------------------------------------------------------------------------ 5. norms a unit feeds


def test_the_norm_a_unit_feeds_is_found_through_activations_and_at_every_use():
    for inplace in (False, True):
        model = ReluBN(inplace).eval()
        (c1, _head) = discover_layers(model, torch.zeros(1, 1, 28, 28))
        assert c1.norms == (model.bn,) and c1.norm_names == ("bn",), inplace
    model = SharedConv().eval()
    (conv, _head) = discover_layers(model, torch.zeros(1, 1, 8, 8))
    assert conv.norms == (model.bn_a, model.bn_b)  # through relu and gelu, one per use


@needs_fashion
def test_node_knockout_of_identical_functions_is_identical(study, registry):
    results = []
    for inplace in (False, True):
        df = run(
            study({"ref": "repro:ReluBN", "options": {"inplace": inplace}}, ["c1"], "node_knockout", [0.0, 1.0]),
            registry=registry,
        )
        results.append(damaged(df)["loss"].to_numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
    assert round(float(results[0][0]), 4) == 2.3023  # the unit stays silent after the norm


# ------------------------------------------------------------------------------------ 6. used, not called


def test_layers_the_forward_pass_uses_without_calling_them_are_found():
    model = MHA().eval()
    names = [l.name for l in discover_layers(model, torch.zeros(1, 1, 28, 28))]
    assert names == ["stem", "attn.out_proj", "head"]
    import torchvision

    vit = torchvision.models.vit_b_16().eval()
    layers = discover_layers(vit, torch.zeros(1, 3, 224, 224))
    assert len(layers) == 38 and layers[0].name == "conv_proj" and layers[-1].name == "heads.head"
    assert [l.name for l in layers[1:4]] == [
        "encoder.layers.encoder_layer_0.self_attention.out_proj",
        "encoder.layers.encoder_layer_0.mlp.0",
        "encoder.layers.encoder_layer_0.mlp.3",
    ]


def test_attention_out_proj_is_perturbed_and_fast_equals_naive(study, tmp_path, registry):
    data = write_fashion(tmp_path / "fashion", n=40)
    spec = study("repro:MHA", ["attn.out_proj"], "synapse_knockout", [0.0, 1.0], n_images=40, data=data)
    fast, naive = fast_and_naive(spec, registry)
    np.testing.assert_allclose(damaged(fast)["loss"], damaged(naive)["loss"], rtol=1e-6)
    clean = fast.loc[fast["perturbation"] == "clean", "loss"].iloc[0]
    assert (damaged(fast)["loss"] != clean).all()  # zeroing out_proj changes the output


# ------------------------------------------------------------------------------------ 7. outputs


def test_logits_come_from_the_first_element_or_the_logits_key(study, tmp_path, registry):
    data = write_fashion(tmp_path / "fashion", n=40)
    for arch in ("TupleOut", "DictOut"):
        df = run(
            study(f"repro:{arch}", ["c1"], "synapse_knockout", [0.0, 1.0], n_images=40, data=data), registry=registry
        )
        assert df["error"].eq("").all() and np.isfinite(df["loss"]).all(), arch


def test_a_model_without_class_scores_is_refused_before_anything_is_written(study, tmp_path, registry):
    from lesionbench.api import run as api_run

    data = write_fashion(tmp_path / "fashion", n=40)
    with pytest.raises(LesionbenchError, match="returns dict, not class scores"):
        api_run(
            study("repro:SetOut", [], "synapse_knockout", [0.0], n_images=40, data=data),
            tmp_path / "out",
            registry=registry,
        )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ 8. dtypes


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_run_and_bit_flips_act_in_their_dtype(study, tmp_path, registry, dtype):
    data = write_fashion(tmp_path / "fashion", n=40)
    spec = study(
        {"ref": "repro:TupleOut", "options": {"dtype": dtype}}, ["c1"], "bit_flip", [0.0, 1e-3], n_images=40, data=data
    )
    fast, naive = fast_and_naive(spec, registry)
    assert fast["error"].eq("").all() or fast["error"].eq("non-finite logits").any()
    np.testing.assert_allclose(damaged(fast)["loss"], damaged(naive)["loss"], rtol=1e-3)
    clean = fast.loc[fast["perturbation"] == "clean", "loss"].iloc[0]
    assert np.isfinite(clean) and (damaged(fast)["loss"] != clean).any()


# ------------------------------------------------------------------------------------ 9. class count


def test_class_count_comes_from_the_output_not_the_declaration_order(study, tmp_path, registry):
    data = write_fashion(tmp_path / "fashion", n=40)
    df = run(study("repro:DeclOrder", [], "synapse_knockout", [0.0, 0.5], n_images=40, data=data), registry=registry)
    assert set(df["layer"]) == {"", "c1", "proj", "head"}
    assert list(dict.fromkeys(df.loc[df["layer"] != "", "layer"])) == ["c1", "proj", "head"]  # forward order


# ------------------------------------------------------------------------------------ 10. bit-flip counts


@pytest.mark.parametrize("weights", [37_748_736, 102_760_448], ids=["alexnet_fc6", "vgg16_fc6"])
@pytest.mark.parametrize("rate", [1e-7, 1e-6])
def test_bit_flip_counts_follow_the_binomial_exactly(weights, rate):
    bits = 32 * weights
    draws = np.array([binomial_count(bits, rate, generator_for(seed)) for seed in range(3000)])
    law = stats.binom(bits, rate)
    assert stats.kstest(draws, law.cdf).pvalue > 1e-3 or _chi2_pvalue(draws, law) > 1e-3
    assert abs(draws.mean() - law.mean()) < 4 * law.std() / np.sqrt(len(draws))
    assert 0.85 < draws.var() / law.var() < 1.15  # float32 torch.binomial gave 1.2–1.8×


def _chi2_pvalue(draws: np.ndarray, law) -> float:
    """χ² goodness of fit over bins of about equal probability (the KS test is conservative for counts)."""
    edges = np.unique(law.ppf(np.linspace(0, 1, 21)[1:-1]))
    observed = np.bincount(np.searchsorted(edges, draws, side="left"), minlength=len(edges) + 1)
    cdf = law.cdf(edges)
    expected = np.diff(np.concatenate([[0.0], cdf, [1.0]])) * len(draws)
    return float(stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


def test_bit_flip_count_is_reproducible_from_the_cell_seed():
    assert binomial_count(10**9, 1e-6, generator_for(7)) == binomial_count(10**9, 1e-6, generator_for(7))
    assert binomial_count(10**9, 1e-6, generator_for(7)) != binomial_count(10**9, 1e-6, generator_for(8))
