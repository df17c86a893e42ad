"""Built-in plugins are independent: none imports another, and one that fails at import, in its hook or
against its contract leaves every other plugin working ("a broken plugin hurts only itself")."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import lesionbench.registry as registry_mod
from lesionbench.damage import FRACTION_LEVELS, apply_bit_masks, zero_random_entries
from lesionbench.hookspecs import hookimpl
from lesionbench.perturbation import generator_for
from lesionbench.registry import create_registry

REPO = Path(__file__).resolve().parents[1]
PLUGIN_MODULES = {f"lesionbench.plugins.{p.stem}" for p in (REPO / "plugins").glob("*.py") if p.stem != "__init__"}


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y, inside lesionbench.plugins
                base = ".".join(["lesionbench.plugins", *([node.module] if node.module else [])])
                names.update([base, *(f"{base}.{a.name}" for a in node.names)])
            elif node.module:
                names.update([node.module, *(f"{node.module}.{a.name}" for a in node.names)])
    return names


def test_no_plugin_module_imports_another():
    offenders = {}
    for path in sorted((REPO / "plugins").glob("*.py")):
        others = {n for n in _imported(path) if n.startswith("lesionbench.plugins")} - {
            f"lesionbench.plugins.{path.stem}"
        }
        if others:
            offenders[path.name] = sorted(others)
    assert offenders == {}
    assert len(PLUGIN_MODULES) > 15  # the glob saw the plugins


def test_the_ast_check_sees_an_import_of_another_plugin(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from lesionbench.plugins.synapse_knockout import LEVELS\nfrom . import bit_flip\n")
    assert {"lesionbench.plugins.synapse_knockout", "lesionbench.plugins.bit_flip"} <= _imported(bad)


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Forget the imported built-in plugins, so a registry imports each afresh (restored afterwards)."""
    import lesionbench.plugins as package

    for name in [m for m in sys.modules if m.startswith("lesionbench.plugins.")]:
        stem = name.rpartition(".")[2]
        if hasattr(package, stem):
            monkeypatch.setattr(package, stem, getattr(package, stem))  # put back afterwards, as the module
        monkeypatch.delitem(sys.modules, name)
    return monkeypatch


def test_a_builtin_failing_at_import_leaves_every_other_builtin_working(fresh_plugins):
    # synapse_knockout once held the level grid eight other plugins imported
    fresh_plugins.setitem(sys.modules, "lesionbench.plugins.synapse_knockout", None)  # importing it raises
    registry = create_registry(entry_points=False)
    (failure,) = registry.failures
    assert failure.plugin == "synapse_knockout" and failure.stage == "load"
    assert set(registry.plugin_names()) == set(registry_mod.BUILTIN_PLUGINS) - {"synapse_knockout"}
    perturbations = registry.contributions("perturbations")
    assert "synapse_knockout" not in perturbations
    for name in (
        "node_knockout",
        "stuck_at_zero",
        "stuck_at_one",
        "filter_prune",
        "magnitude_prune",
        "reinit",
        "weight_draw",
        "activation_knockout",
        "block_removal",
        "bit_flip",
        "activation_bit_flip",
    ):
        assert name in perturbations, name


def test_a_builtin_whose_hook_raises_or_breaks_the_contract_hurts_only_itself(fresh_plugins):
    import lesionbench.plugins.bit_flip as bit_flip
    import lesionbench.plugins.node_knockout as node_knockout

    @hookimpl
    def raising():
        raise RuntimeError("planted")

    good = node_knockout.lesionbench_perturbations()[0]

    @hookimpl
    def nameless():
        return [dataclasses.replace(good, name="")]

    fresh_plugins.setattr(bit_flip, "lesionbench_perturbations", raising)
    fresh_plugins.setattr(node_knockout, "lesionbench_perturbations", nameless)
    registry = create_registry(entry_points=False)
    perturbations = registry.contributions("perturbations")
    failures = {f.plugin: f.message for f in registry.failures}
    assert failures.keys() == {"bit_flip", "node_knockout"}
    assert "RuntimeError: planted" in failures["bit_flip"]
    assert "field 'name' must be a non-empty string" in failures["node_knockout"]
    assert not {"bit_flip", "bit_flip_sign", "node_knockout"} & set(perturbations)
    assert {"synapse_knockout", "stuck_at_one", "activation_bit_flip", "filter_prune"} <= set(perturbations)


def test_shared_helpers_do_what_their_docstrings_say():
    x = torch.arange(1.0, 101.0).reshape(10, 10)
    zero_random_entries(x, 0.37, generator_for(0))
    assert int((x == 0).sum()) == 37  # floor(0.37 · 100)
    assert FRACTION_LEVELS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    w = torch.tensor([1.5, -2.0, 0.25])
    apply_bit_masks(w, torch.tensor([1 << 31, 0, 1 << 31]), "xor")  # float32 sign bit
    assert w.tolist() == [-1.5, -2.0, -0.25]
    apply_bit_masks(w, torch.tensor([1 << 31, 1 << 31, 0]), "or")
    assert w.tolist() == [-1.5, -2.0, -0.25]
    with pytest.raises(ValueError, match="'and'"):
        apply_bit_masks(w, torch.zeros(3, dtype=torch.int64), "and")
