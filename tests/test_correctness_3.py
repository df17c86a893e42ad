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
from torchvision import transforms

from conftest import write_fashion
from lesionbench.api import run
from lesionbench.errors import LesionbenchError
from lesionbench.graph import ModelGraph
from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel
from lesionbench.registry import create_registry

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


class HFConv1D(nn.Module):
    """transformers' Conv1D (GPT-2, ImageGPT): a linear layer whose weight is stored [in, out]."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc = Conv1D(64, 8 * 14 * 14)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(F.relu(self.c1(x)).flatten(1))))


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


ARCHS = {f.__name__: f for f in (HFConv1D, CatEmpty)}


# ------------------------------------------------------------------------------------ harness


def silence(model: nn.Module, names: list[str]) -> nn.Module:
    """The oracle of node knockout at p = 1: every named module's output replaced by zeros."""
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    return model


class Source:
    """The cases as model plugin ``case3:NAME``; option ``silence`` applies the oracle above."""

    name, description = "case3", "correctness cases, third round"

    def claims(self, arch):
        return False

    def examples(self):
        return sorted(ARCHS)

    def build(self, spec):
        opts = dict(spec.options)
        silenced = list(opts.pop("silence", []))
        torch.manual_seed(0)
        module = silence(ARCHS[spec.arch](**opts).eval(), silenced)
        pre = transforms.Compose([transforms.Grayscale(1), transforms.Resize((28, 28)), transforms.ToTensor(),
                                  transforms.Normalize((0.286,), (0.353,))])  # fmt: skip
        return LoadedModel(name=spec.ref, module=module, num_classes=10, input_size=(1, 28, 28), preprocess=pre,
                           preprocess_key="repro3-grey28")  # fmt: skip


class Plugin:
    @hookimpl
    def lesionbench_models(self):
        return [Source()]


@pytest.fixture(scope="module")
def registry():
    return create_registry([("case3", Plugin())])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fashion") / "fashion", n=40)


def study(model, layers, perturbations, levels, data, draws=1, **extra) -> dict:
    ref = model if isinstance(model, dict) else {"ref": model}
    perturbations = [perturbations] if isinstance(perturbations, str) else perturbations
    return {"name": "case3", "models": [ref], "layers": layers, "perturbations": perturbations,
            "levels": {p: levels for p in perturbations}, "draws": draws, "device": "cpu", "seed": 0,
            "dataset": {"name": "fashion_mnist", "n_images": 40, "path": str(data)}} | extra  # fmt: skip


def fast_and_naive(spec: dict, registry) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames = [run(spec | {"engine": e}, registry=registry).sort_values(KEY, ignore_index=True) for e in ("fast", "naive")]
    return frames[0], frames[1]


def clean_loss(arch: str, data, registry, **options) -> float:
    """The loss of the case's model (with ``options``, e.g. the silencing oracle), undamaged."""
    df = run(study({"ref": f"case3:{arch}", "options": options}, [], "synapse_knockout", [0.0], data), registry=registry)
    return float(df.loc[df["perturbation"] == "clean", "loss"].iloc[0])


def loss_at(df: pd.DataFrame, perturbation: str, level: float, layer: str | None = None) -> np.ndarray:
    rows = df[(df["perturbation"] == perturbation) & (df["level"] == level)]
    return rows[rows["layer"] == layer]["loss"].to_numpy() if layer else rows["loss"].to_numpy()


# ------------------------------------------------------------------------------------ Conv1D


def test_transformers_conv1d_is_a_layer_whose_units_are_the_weight_columns(data, registry):
    pytest.importorskip("transformers")
    graph = ModelGraph.of(HFConv1D().eval(), torch.zeros(1, 1, 28, 28))
    fc = next(l for l in graph.layers if l.name == "fc")
    assert [l.name for l in graph.layers] == ["c1", "fc", "head"] and not graph.left_out
    assert fc.out_units == 64 and fc.kind == "linear"  # weight [1568, 64]: 64 columns, one per unit
    spec = study("case3:HFConv1D", ["fc"], ["node_knockout", "filter_prune", "synapse_knockout"], [0.0, 0.5, 1.0],
                 data, draws=2)  # fmt: skip
    fast, naive = fast_and_naive(spec, registry)
    np.testing.assert_allclose(fast["loss"], naive["loss"], rtol=1e-6)
    silenced = clean_loss("HFConv1D", data, registry, silence=["fc"])  # the oracle: fc emits zeros
    for perturbation in ("node_knockout", "filter_prune", "synapse_knockout"):
        np.testing.assert_allclose(loss_at(fast, perturbation, 1.0), silenced, rtol=1e-6)
    clean = clean_loss("HFConv1D", data, registry)
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


def test_cat_onto_an_empty_tensor_runs_and_units_keep_their_offsets(data, registry):
    graph = ModelGraph.of(CatEmpty().eval(), torch.zeros(1, 1, 28, 28))
    assert [l.name for l in graph.layers] == ["branches.0", "branches.1", "branches.2", "head"]
    fast, naive = fast_and_naive(study("case3:CatEmpty", [], "synapse_knockout", [0.0, 1.0], data), registry)
    np.testing.assert_allclose(fast["loss"], naive["loss"], rtol=1e-6)
    assert fast["error"].eq("").all()


def test_an_internal_failure_is_reported_as_lesionbench_s_not_the_plugin_s(data, registry, monkeypatch):
    import lesionbench.graph as graph_module

    def broken(*_args, **_kwargs):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(graph_module, "follow_units", broken)
    with pytest.raises(LesionbenchError) as info:
        run(study("case3:CatEmpty", [], "synapse_knockout", [0.0], data), registry=registry)
    message = str(info.value)
    assert message.startswith("lesionbench failed while analysing the layers of model 'case3:CatEmpty'")
    assert "bug in lesionbench" in message and "plugin 'case3'" not in message
