"""Names that moved when a module was split along its seams stay importable from where they were.

Plugins import the damage primitives from ``lesionbench.perturbation``, tests and benchmarks the engines
from ``lesionbench.engine`` and ``recalibrate`` from ``lesionbench.cells``: each old path must give the
very object of the module the name lives in now (a copy would let a monkeypatch of one miss the other).
"""

from __future__ import annotations

import importlib

import pytest

MOVED = {  # old module -> {new module: names}
    "lesionbench.perturbation": {
        "lesionbench.draws": [
            "PERMUTE_BELOW",
            "ZERO_CHUNK",
            "count_for",
            "positions_mask",
            "random_subset_mask",
            "zero_entries",
            "binomial_count",
            "distinct_positions",
        ],
        "lesionbench.hook_routing": [
            "HOOKED_OPS",
            "ROUTED_OPS",
            "attention_out_projections",
            "OutProjectionCalled",
            "HooksAtFunctionalUse",
        ],
    },
    "lesionbench.engine": {
        "lesionbench.naive_engine": ["LayerEval", "NaiveEngine", "VARIANT_BUDGET_BYTES", "MAX_IMAGES_PER_PASS"],
        "lesionbench.suffix_engine": ["SuffixEngine", "DEFAULT_BUDGET_BYTES", "_INPUT"],
        "lesionbench.spill": ["SpilledBatches"],
    },
    "lesionbench.plot_base": {"lesionbench.plot_paths": ["MAX_COLUMNS", "MAX_PAGE_HEIGHT_IN", "pages", "safe_name"]},
    "lesionbench.plots": {
        "lesionbench.plot_paths": [
            "safe_name",
            "pages",
            "heatmap_rows",
            "heatmap_groups",
            "heatmap_row_height",
            "planned_paths",
        ]
    },
    "lesionbench.class_plots": {"lesionbench.plot_paths": ["class_path", "planned_class_paths"]},
    "lesionbench.cells": {
        "lesionbench.rows": ["chance_warning", "unigram_chance"],
        "lesionbench.recalibration": ["recalibrate"],
    },
}
CASES = [(old, new, name) for old, homes in MOVED.items() for new, names in homes.items() for name in names]


@pytest.mark.parametrize(("old", "new", "name"), CASES, ids=[f"{o}.{n}" for o, _new, n in CASES])
def test_a_moved_name_is_the_same_object_at_its_old_path(old, new, name):
    obj = getattr(importlib.import_module(new), name)
    assert getattr(importlib.import_module(old), name) is obj
    if callable(obj):  # a function or class is defined in its new home, not re-exported there in turn
        assert obj.__module__ == new


def test_the_plugin_surface_reaches_the_moved_primitives():
    """``from lesionbench import count_for`` (what a third-party plugin writes) gives the primitive itself."""
    import lesionbench
    import lesionbench.draws

    for name in ["count_for", "random_subset_mask", "positions_mask", "binomial_count"]:
        assert getattr(lesionbench, name) is getattr(lesionbench.draws, name)
