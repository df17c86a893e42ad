"""Layer discovery: forward order, relative depth, kinds, the BatchNorm a layer feeds, selection."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from lesionbench.errors import LesionbenchError
from lesionbench.graph import discover_layers
from lesionbench.layers import select_layers


class Reordered(nn.Module):
    """Declares b, c, a but runs a -> c -> b."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(2 * 4 * 4, 5)
        self.c = nn.Conv2d(2, 2, 1)
        self.a = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        x = self.c(x)
        return self.b(x.flatten(1))


def example() -> torch.Tensor:
    return torch.zeros(1, 1, 4, 4)


def test_declaration_order_is_not_forward_order():
    model = Reordered()
    assert [n for n, m in model.named_modules() if n] == ["b", "c", "a"]
    layers = discover_layers(model, example())
    assert [l.name for l in layers] == ["a", "c", "b"]
    assert [l.index for l in layers] == [0, 1, 2]
    assert [l.relative_depth for l in layers] == pytest.approx([0.0, 0.5, 1.0])
    assert [l.kind for l in layers] == ["conv", "conv", "linear"]
    assert [l.out_units for l in layers] == [2, 2, 5]
    assert layers[0].module is model.a and layers[2].module is model.b
    # without aliases the display name is the module path
    assert [l.display for l in layers] == ["a", "c", "b"]


def test_relative_depth_is_even_over_many_layers():
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(5)])
    layers = discover_layers(model, torch.zeros(1, 3))
    assert [l.relative_depth for l in layers] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_single_layer_has_depth_zero():
    layers = discover_layers(nn.Linear(3, 2), torch.zeros(1, 3))
    assert len(layers) == 1
    assert layers[0].relative_depth == 0.0 and layers[0].name == ""


def test_layer_used_twice_is_listed_once():
    lin = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin
            self.head = nn.Linear(3, 1)

        def forward(self, x):
            return self.head(self.lin(self.lin(x)))

    layers = discover_layers(Twice(), torch.zeros(1, 3))
    assert [l.name for l in layers] == ["lin", "head"]


def test_discovery_restores_training_mode_and_removes_hooks():
    model = Reordered().train()
    discover_layers(model, example())
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.eval()
    discover_layers(model, example())
    assert not model.training


def test_aliases_become_display_names():
    layers = discover_layers(Reordered(), example(), aliases={"a": "conv1", "b": "fc"})
    assert [l.display for l in layers] == ["conv1", "c", "fc"]
    assert [l.name for l in layers] == ["a", "c", "b"]


def test_norm_detection_in_timm_resnet18():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    layers = {l.name: l for l in discover_layers(model, torch.zeros(1, 3, 32, 32))}
    assert layers["conv1"].norm_names == ("bn1",)
    assert layers["conv1"].norms == (model.bn1,)
    assert layers["conv1"].modules() == [model.conv1, model.bn1]
    assert layers["layer1.0.conv2"].norm_names == ("layer1.0.bn2",)
    assert layers["layer2.0.downsample.0"].norm_names == ("layer2.0.downsample.1",)
    assert layers["fc"].norms == () and layers["fc"].norm_names == ()
    assert layers["fc"].modules() == [model.fc]
    assert list(layers)[0] == "conv1" and list(layers)[-1] == "fc"
    assert layers["fc"].kind == "linear" and layers["fc"].out_units == 10


def test_norm_only_for_the_conv_that_feeds_it():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    layers = discover_layers(model, torch.zeros(1, 1, 8, 8))
    assert [l.name for l in layers] == ["0", "3"]
    assert layers[0].norms == (model[1],) and layers[0].norm_names == ("1",)
    assert layers[1].norms == () and layers[1].norm_names == ()


def test_select_layers_by_alias_and_path_in_forward_order():
    layers = discover_layers(Reordered(), example(), aliases={"a": "conv1", "b": "fc"})
    # asked for out of order, by alias ("fc", "conv1") and by module path ("c")
    chosen = select_layers(layers, ["fc", "c"])
    assert [l.name for l in chosen] == ["c", "b"]
    chosen = select_layers(layers, ["fc", "conv1"])
    assert [l.name for l in chosen] == ["a", "b"]
    # the module path of an aliased layer works too, and naming a layer twice keeps it once
    chosen = select_layers(layers, ["a", "conv1"])
    assert [l.display for l in chosen] == ["conv1"]
    assert select_layers(layers, None) == layers
    assert select_layers(layers, []) == layers


def test_select_unknown_layer_lists_valid_names():
    layers = discover_layers(Reordered(), example(), aliases={"a": "conv1", "b": "fc"})
    with pytest.raises(LesionbenchError) as info:
        select_layers(layers, ["conv1", "conv9"])
    msg = str(info.value)
    assert "conv9" in msg
    assert "Did you mean 'conv1'?" in msg
    assert "Valid: c, conv1, fc" in msg
