"""Issue #23: six definitional invariants checked over generated models (fast, fixed-seed mode).

The models come from :mod:`property_models` (a grammar of real patterns), the oracles from
:mod:`property_oracles` (written from the definitions, not from lesionbench's code). The long
mode, with many more models and two levels per perturbation, is ``perf/properties.py``;
every failure either mode found is kept, shrunk, in ``test_properties_regressions.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings

import lesionbench.plugins.node_knockout as node_knockout
import lesionbench.plugins.synapse_knockout as synapse_knockout
from lesionbench import perturbation
from property_models import TRANSFORMER_BLOCKS, Spec, specs
from property_oracles import check

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(
    derandomize=True,
    max_examples=15,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FAST
@given(specs(max_blocks=3))
def test_the_six_invariants_hold_on_generated_models(spec):
    torch.set_num_threads(1)
    cells, failures, _refused = check(spec)
    assert cells > 0
    assert not failures, f"{spec}\n" + "\n".join(failures)


@settings(FAST, max_examples=5)
@given(specs(max_blocks=2, blocks=TRANSFORMER_BLOCKS))
def test_the_invariants_hold_on_generated_transformers(spec):
    """The same check on models drawn from the transformer patterns only (decoder stacks in the LLaMA
    and GPT-2 layouts, attention, token layers, residual stages), where (g) has the most to check."""
    torch.set_num_threads(1)
    cells, failures, _refused = check(spec)
    assert cells > 0
    assert not failures, f"{spec}\n" + "\n".join(failures)


LLAMA = Spec((("dec", "llama", 1, 4, 2, True),))  # grouped-query attention: 4 query heads, 2 key/value heads
LLAMA2 = Spec((("dec", "llama", 2, 2, 1, True),))  # two decoder layers: block_drop acts on them


def test_the_oracles_catch_a_head_knockout_that_silences_part_of_a_head(monkeypatch):
    """(g) is not blind: a head knockout that zeroes only the first half of each chosen head's slice fails."""
    import lesionbench.plugins.head_knockout as head_knockout

    real = head_knockout.head_features
    monkeypatch.setattr(head_knockout, "head_features", lambda heads, chosen: real(heads, chosen)[::2])
    failures = check(LLAMA, only=["head_knockout"])[1]
    assert {f.split(":")[0] for f in failures} == {"(g) blocks.0.layers.0.self_attn"}


def test_the_oracles_catch_a_block_drop_and_a_neuron_knockout_that_do_nothing(monkeypatch):
    import lesionbench.plugins.block_drop as block_drop
    import lesionbench.plugins.mlp_neuron_knockout as mlp_neuron_knockout

    monkeypatch.setattr(block_drop, "identity_hook", lambda name: lambda module, args, kwargs, output: None)
    monkeypatch.setattr(
        mlp_neuron_knockout,
        "zero_features",
        lambda module, features: module.register_forward_pre_hook(lambda m, a: None),
    )
    failures = [f.split(" loss")[0] for f in check(LLAMA2, only=["mlp_neuron_knockout", "block_drop"])[1]]
    assert sorted(failures) == [
        "(g) blocks.0.layers.0.mlp: mlp_neuron_knockout 0.125",
        "(g) blocks.0.layers.0.mlp: mlp_neuron_knockout 1.0",
        "(g) blocks.0.layers.0: block_drop 1.0",
        "(g) blocks.0.layers.1.mlp: mlp_neuron_knockout 0.125",
        "(g) blocks.0.layers.1.mlp: mlp_neuron_knockout 1.0",
        "(g) blocks.0.layers.1: block_drop 1.0",
    ]


def test_the_oracles_catch_a_node_knockout_that_forgets_the_norm(monkeypatch):
    """The harness is not blind: node knockout that silences the conv but not the BatchNorm it feeds fails (c)."""

    def weights_only(layer, units):
        layer.module.weight[units] = 0
        layer.module.bias[units] = 0

    spec = Spec((("conv", 4, "bn", "relu", False, "module"),))
    assert check(spec)[1] == []
    monkeypatch.setattr(node_knockout, "silence_units", weights_only)
    failures = check(spec)[1]
    assert [f.split(":")[0] for f in failures] == ["(c) blocks.0.conv"]


def test_the_oracles_catch_a_cell_that_is_not_undone(monkeypatch):
    """(e) is not blind either: if the harness forgot to restore a layer's tensors after a cell, the
    next cell and the end of the run find the model changed."""
    monkeypatch.setattr(perturbation, "_restore", lambda module, snapshot: None)
    failures = check(Spec((("conv", 4, "none", "relu", False, "module"),)))[1]
    assert any(f.startswith("(e) before the cell ") for f in failures)
    assert any(f.startswith("(e) after the runs: changed ['blocks.0.conv") for f in failures)


def test_a_cell_that_fails_is_a_failure_not_a_skipped_check(monkeypatch):
    def broken(tensor, fraction, generator):
        raise RuntimeError("planted")

    monkeypatch.setattr(synapse_knockout, "zero_random_entries", broken)
    failures = check(Spec((("conv", 4, "none", "relu", False, "module"),)))[1]
    assert "(a) naive cell blocks.0.conv/synapse_knockout/1.0 failed: RuntimeError: planted" in failures


def test_the_long_mode_prints_its_counts(capsys):
    sys.path.insert(0, str(ROOT / "perf"))
    try:
        from properties import main
    finally:
        sys.path.remove(str(ROOT / "perf"))
    status = main(["--examples", "1", "--max-blocks", "1", "--seed", "3"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"1 models, \d+ cells, \d+ failures \(\d models, \d+ kinds\)", last), last
    assert status == (0 if last.split(" cells, ")[1].startswith("0 failures") else 1)
