"""The perturbation kind and the level-axis scale as types: each owns its behaviour, old strings map to them."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lesionbench.errors import LesionbenchError
from lesionbench.kinds import DESCENDING, HOOKS, LINEAR, LOG, WEIGHTS, axis_scale, format_level, perturbation_kind
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, Perturbation, generator_for, perturbed

REPO = Path(__file__).resolve().parents[1]


def test_scales_map_levels_to_the_scoring_coordinate_and_back():
    levels = [0.001, 0.01, 0.5]
    assert LINEAR.to_coord(levels).tolist() == levels
    assert DESCENDING.to_coord([8, 4, 2]).tolist() == [-8.0, -4.0, -2.0]  # fewer bits: further right
    assert LOG.to_coord(levels).tolist() == pytest.approx([math.log10(x) for x in levels])
    for scale in (LINEAR, DESCENDING, LOG):
        assert scale.from_coord(scale.to_coord([0.25])[0]) == pytest.approx(0.25)
        assert scale.from_coord(math.inf) == math.inf  # a level never reached stays "never"
        assert math.isnan(scale.from_coord(math.nan))
        assert np.isinf(scale.from_coord(np.array([math.inf, 0.0]))[0])
    assert LOG.scored([0.0, 1e-6, 1e-3]).tolist() == [False, True, True]  # log10 0 has no place
    assert LINEAR.scored([0.0, 1.0]).tolist() == [True, True]


def test_scales_format_and_place_levels():
    assert LINEAR.beyond(1.0) == "> 1" and LOG.beyond(0.001) == "> 0.001" and DESCENDING.beyond(2.0) == "< 2"
    assert [format_level(x) for x in (1e-6, 0.001, 0.5, 2.0)] == ["1e-6", "1e-3", "0.5", "2"]
    x, clean = LOG.plot_positions([0.0, 1e-6, 1e-3])
    assert clean == pytest.approx(1e-7)  # a decade below the smallest level (span of 3 decades / 4 < 1)
    assert x.tolist() == pytest.approx([1e-7, 1e-6, 1e-3])
    assert LINEAR.plot_positions([0.0, 0.5]) == (pytest.approx([0.0, 0.5]), None)
    assert (LINEAR.note, LOG.note, DESCENDING.note) == ("", "log scale", "damage grows as it falls")


def test_old_strings_map_to_the_types_and_compare_equal():
    assert axis_scale("log") is LOG and axis_scale("") is LINEAR and axis_scale(DESCENDING) is DESCENDING
    assert perturbation_kind("hooks") is HOOKS and perturbation_kind(WEIGHTS) is WEIGHTS
    assert LOG == "log" and HOOKS == "hooks" and LOG != "linear" and WEIGHTS != HOOKS
    assert LevelAxis("p", scale="log").scale is LOG and LevelAxis("p", scale=LOG) == LevelAxis("p", scale="log")
    assert LevelAxis("bits", damage_grows=False).kind is DESCENDING and LevelAxis("p").kind == "linear"
    with pytest.raises(LesionbenchError, match="unknown level axis 'logarithmic'"):
        LevelAxis("p", scale="logarithmic")
    with pytest.raises(LesionbenchError, match="unknown perturbation kind 'hook'"):
        perturbation_kind("hook")


class _OldStyleHooks(Perturbation):
    """A third-party perturbation of lesionbench 0.1: kind as a string, on the plain base class."""

    kind = "hooks"

    def hooks(self, layer, level, generator):
        return [layer.module.register_forward_hook(lambda _m, _i, out: out * (1 - level))]


def test_a_perturbation_declaring_its_kind_as_a_string_is_applied_by_that_kind():
    p = _OldStyleHooks(name="old", description="scales outputs", default_levels=(0.0, 0.5), level_range=(0.0, 1.0))
    module = nn.Linear(3, 2)
    layer = Layer(name="fc", display="fc", index=0, relative_depth=0.0, kind="linear", module=module)
    x = torch.ones(1, 3)
    clean = module(x)
    with perturbed(layer, p, 0.5, generator_for(0)) as hooked:
        assert hooked is True
        assert torch.allclose(module(x), clean * 0.5)
    assert torch.equal(module(x), clean) and not module._forward_hooks


def test_no_module_dispatches_on_the_kind_or_scale_strings():
    pattern = re.compile(
        r"""[!=]=\s*["'](weights|hooks|log|descending)["']|["'](weights|hooks|log|descending)["']\s*[!=]="""
    )
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in sorted((REPO / "benchmark").rglob("*.py"))
        if p.name != "kinds.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
