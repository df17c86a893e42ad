"""A perturbation that can damage only some of its targets says so before a study starts
(``Perturbation.check_hooks``, run on one forward pass of the clean model by the plan): one
line, nothing written — not a refusal in the middle of the run that leaves a half-written run directory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lesionbench
from lesionbench.errors import LesionbenchError


class TinyAttention(nn.Module):  # found by transformer_parts: "attention" in its class name, heads, o_proj
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_heads = 2
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.o_proj(self.v_proj(x).mean(dim=1, keepdim=True).expand_as(x))


class Block(nn.Module):
    def __init__(self, dim: int, pool: bool) -> None:
        super().__init__()
        self.attn = TinyAttention(dim)
        self.pool = pool  # a funnel-style block: halves the sequence, so it has no identity to fall back on

    def forward(self, x):
        x = x + self.attn(x)
        return x[:, ::2] if self.pool else x


class Stack(nn.Module):
    """[N, 8, 4] → three blocks (the middle one pools) → [N, 3] class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(4, pool=i == 1) for i in range(3)])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x.mean(dim=1))


class BasicBlock(nn.Module):  # block_removal's residual-block rule: a BasicBlock without a downsample
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, stride=stride, padding=1)
        self.downsample = None

    def forward(self, x):
        return torch.relu(self.conv(x) + (x if self.conv.stride == (1, 1) else x[:, :, ::2, ::2]))


class Stages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(BasicBlock(1), BasicBlock(2))  # the second halves the image
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.layer1(x).mean(dim=(2, 3)))


CASES = {
    "block_drop": (Stack, (8, 4), "layers.1"),
    "block_removal": (Stages, (3, 8, 8), "layer1.1"),
}


@pytest.mark.parametrize("perturbation", sorted(CASES))
def test_a_target_the_damage_cannot_apply_to_is_refused_before_anything_is_written(perturbation, tmp_path):
    build, shape, culprit = CASES[perturbation]
    torch.manual_seed(0)
    model = build().eval()
    data = (torch.randn(12, *shape), torch.arange(12) % 3)
    out = tmp_path / "run"
    with pytest.raises(LesionbenchError) as caught:
        lesionbench.run(model=model, data=data, out=out, perturbations=[perturbation], draws=1, progress=False)
    message = str(caught.value)
    assert "\n" not in message and perturbation in message and repr(culprit) in message.replace("'model.", "'")
    assert "shape" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_check_hooks_leave_the_model_as_it_was_and_a_model_that_fits_runs(tmp_path):
    """Every block keeps its shape: the study runs, and the model carries no hook afterwards."""
    torch.manual_seed(0)
    model = Stack().eval()
    model.layers[1].pool = False
    data = (torch.randn(12, 8, 4), torch.arange(12) % 3)
    rows = lesionbench.run(model=model, data=data, perturbations=["block_drop"], draws=1, progress=False)
    assert sorted(rows.loc[rows["perturbation"] == "block_drop", "layer"].unique()) == [
        "layers.0",
        "layers.1",
        "layers.2",
    ]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
