"""Failures the property harness found (``test_properties.py``, ``perf/properties.py``), each
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
from property_oracles import ABSENT, check


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
        lesionbench.run(
            {"perturbations": ["rerandomize"], "draws": 1, "device": "cpu"},
            tmp_path / "run",
            model=model,
            data=(images, labels),
        )
    assert not (tmp_path / "run").exists()
    cells, failures, refused = check(Spec((("tok", 4, "conv1d", "bn"),)))
    refusals = [name for name, why in refused.items() if why != ABSENT]  # not the perturbations of absent parts
    assert failures == [] and refusals == ["rerandomize"] and cells > 0


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


def _vit_b16_like() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """torchvision's ViT (``vit_b_16``'s code) in a tiny configuration, with a head that is not zero."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=5
    ).eval()
    for name, p in model.named_parameters():
        if name.endswith(("out_proj.bias", "head.weight")):
            nn.init.normal_(p, std=0.5)
    return model, torch.randn(6, 3, 8, 8), torch.arange(6) % 5


def _loss_with(model, images, labels, values: dict) -> float:
    from torch.func import functional_call

    with torch.no_grad():
        out = functional_call(model, values, (images,))
    return float(torch.nn.functional.cross_entropy(out, labels))


@pytest.mark.parametrize("engine", ["naive", "fast"])
def test_hook_perturbations_and_head_knockout_damage_multihead_attention_out_proj(engine):
    """Found (the MHA case): ``nn.MultiheadAttention`` applies ``out_proj`` inside
    ``F.multi_head_attention_forward`` and never calls it, so activation perturbations were refused on
    it and head knockout's pre-hook on it never ran. Oracles from the definitions: the projection's
    output zeroed (its weight and bias zero) for activation knockout at p = 1; every head's slice of
    its input zeroed (its weight zero, the bias kept) for head knockout at p = 1; at p = 1/2 one of
    the two heads (its columns of the weight zero)."""
    torch.set_num_threads(1)
    model, images, labels = _vit_b16_like()
    attn, out = (
        "encoder.layers.encoder_layer_1.self_attention",
        "encoder.layers.encoder_layer_1.self_attention.out_proj",
    )
    study = {
        "perturbations": ["activation_knockout", "activation_noise", "head_knockout"],
        "draws": 1,
        "levels": {"activation_knockout": [1.0], "activation_noise": [2.0], "head_knockout": [0.5, 1.0]},
        "device": "cpu",
        "engine": engine,
        "layers": [out],
    }
    rows = lesionbench.run(study, model=model, data=(images, labels)).set_index(["layer", "perturbation", "level"]).loss
    weight = model.get_submodule(out).weight
    zero = torch.zeros_like(weight)
    assert rows[(out, "activation_knockout", 1.0)] == pytest.approx(
        _loss_with(model, images, labels, {f"{out}.weight": zero, f"{out}.bias": torch.zeros(8)}), abs=1e-5
    )
    assert rows[(attn, "head_knockout", 1.0)] == pytest.approx(
        _loss_with(model, images, labels, {f"{out}.weight": zero}), abs=1e-5
    )
    one_head = [
        _loss_with(
            model, images, labels, {f"{out}.weight": weight.detach().index_fill(1, torch.arange(h * 4, h * 4 + 4), 0)}
        )
        for h in (0, 1)
    ]
    assert min(abs(rows[(attn, "head_knockout", 0.5)] - o) for o in one_head) < 1e-5
    assert abs(rows[(out, "activation_noise", 2.0)] - rows[("", "clean", 0.0)]) > 1e-4


def test_block_drop_acts_on_the_decoder_layers_not_on_a_stack_that_changes_width():
    """Found by the transformer fast mode (shrunk): a model whose only block is a LLaMA-layout decoder
    stack (an embedding from 3 to 8 features, then one decoder layer): ``block_drop`` chose the model's
    own one-element block list, whose stack changes the width, refused it at its first pass mid-run,
    and left a half-written run directory. Blocks now have parameters alike and, of lists equally
    long, the innermost is taken: the decoder layer is dropped, as (g) defines."""
    from lesionbench.transformer_parts import transformer_blocks
    from property_models import build

    spec = Spec((("dec", "llama", 1, 2, 1, False),))
    assert [path for path, _m in transformer_blocks(build(spec)[0])] == ["blocks.0.layers.0"]
    assert failures_of(spec) == []


def test_reinit_of_a_storage_tied_layer_in_half_precision_moves_both_users():
    """Found (long run, 2026-12-06): two Parameters sharing one storage, built in float32 and then
    ``.to(float16)``, came out untied (``Module.to`` converts each Parameter on its own), so the
    generated model was not the spec's: (g) expected reinit of ``a`` to move ``b``'s weight too and
    failed (loss 1.7001 against 1.7067 at α = 1). The generator ties them again after a dtype change;
    lesionbench damages whatever ties the model it is given has."""
    from property_models import build

    for dtype in ("float16", "bfloat16", "float32"):
        block = build(Spec((("tied", True),), dtype=dtype))[0].blocks[0]
        assert block.a.weight.dtype == getattr(torch, dtype)
        assert block.a.weight.untyped_storage().data_ptr() == block.b.weight.untyped_storage().data_ptr()
    torch.set_num_threads(1)
    assert check(Spec((("tied", True),), dtype="float16"), only=("reinit",))[1] == []
