"""Failures the property harness found (``test_properties.py``, ``benchmarks/properties.py``), each
shrunk to the smallest generated model that showed it and kept as an ordinary test.

Each model is a :class:`property_models.Spec`; ``check`` runs every layer × built-in perturbation
with both engines through ``lesionbench.run`` and returns the invariants a–f that fail.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lesionbench
from property_models import Conv1D, Spec
from property_oracles import check


def failures_of(spec: Spec) -> list[str]:
    torch.set_num_threads(1)
    return check(spec)[1]


def test_node_knockout_silences_a_unit_behind_an_activation_fake_quant():
    """Found: a QAT Linear whose output passes a FakeQuantize module before a LayerNorm: node knockout
    at p = 1 left the LayerNorm emitting its shift, (c) failed (loss 1.6607 against 1.7091). Fake
    quantization maps 0 to 0, so the unit is followed through it like an elementwise activation."""
    assert failures_of(Spec((("tok", 4, "qat", "ln"),))) == []
    assert failures_of(Spec((("tok", 6, "qat", "bn"), ("tok", 4, "qat", "rms")), head_norm=True)) == []


def test_rerandomize_refuses_a_layer_without_an_initialiser_before_anything_runs(tmp_path):
    """Found: with transformers' Conv1D now a layer, ``rerandomize`` raised from its first cell on it
    (no ``reset_parameters``), mid-run, leaving a half-written run directory; it is refused in one
    line before the run, and the harness checks the model without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), Conv1D(5, 12))
    images, labels = torch.randn(6, 3, 2, 2), torch.arange(6) % 5
    refusal = r"rerandomize: layer '1' \(Conv1D\) has no reset_parameters"
    with pytest.raises(lesionbench.LesionbenchError, match=refusal):
        lesionbench.run({"perturbations": ["rerandomize"], "draws": 1, "device": "cpu"}, tmp_path / "run",
                        model=model, data=(images, labels))  # fmt: skip
    assert not (tmp_path / "run").exists()
    cells, failures, refused = check(Spec((("tok", 4, "conv1d", "bn"),)))
    assert failures == [] and list(refused) == ["rerandomize"] and cells > 0


# Kinds that branch i23fix fixes (issue #23 item 1), as the harness first met them here.


def test_hook_perturbations_reach_a_conv_read_through_F_conv2d():
    """Found: ``F.conv2d(x, self.conv.weight, self.conv.bias)``: every activation perturbation left
    the loss at its clean value, (d) failed."""
    assert failures_of(Spec((("conv", 4, "none", "none", False, "functional"),))) == []


def test_hook_perturbations_reach_a_conv_called_through_forward():
    """Found: ``self.conv.forward(x)`` bypasses module hooks: the same (d) failure."""
    assert failures_of(Spec((("conv", 4, "bn", "relu", False, "forward"),))) == []


def test_multihead_attention_out_proj_is_damaged_and_in_proj_weight_is_accounted_for():
    """Found (the harness's first shrunk example): ``attn.out_proj`` untouched by hook perturbations
    (d), and ``attn.in_proj_weight`` read by the forward pass but neither a layer nor in run.log (f)."""
    assert failures_of(Spec((("mha", 1, False),))) == []


def test_a_lora_wrapped_linear_is_one_layer_whose_effective_weight_is_damaged():
    """Found: a peft-style LoRA wrapper: the base layer's knockouts kept the adapter's delta (b, c)
    and ``lora_A``/``lora_B`` were studied as layers of their own (f)."""
    assert failures_of(Spec((("tok", 4, "lora", "none"),))) == []


def test_node_knockout_silences_a_lora_layer_through_the_norm_after_its_wrapper():
    """Found by the long mode (seed 0, model 29): a LoRA-wrapped Linear followed by a LayerNorm: the
    norm, fed by the wrapper's output rather than the base layer's, kept emitting its shift at p = 1
    (c) (loss 1.579172 against 1.613922)."""
    assert failures_of(Spec((("tok", 4, "lora", "ln"),), output="dict", seed=279)) == []
