"""A layer score and its verdict mean the same thing whatever the level grid (issue #28's two-level
block removal: the area over (0, 1) was (1 + r)/2, never below 0.50, so a block whose removal is
worse than chance printed "robust")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesionbench.bootstrapping import bootstrap
from lesionbench.scores import area_score, layer_scores
from tables import add_cell, table, with_outcomes

GRIDS = [
    (0.0, 1.0),
    (0.0, 0.5, 1.0),
    tuple(np.round(np.arange(11) / 10, 2)),
    (0.0, 0.2, 0.5, 0.8),
    (0.0, 0.5, 1.0, 2.0),
]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("kept", [0.0, 0.3, 0.7, 1.0])
def test_the_same_retention_at_every_damaged_level_scores_the_same_on_every_grid(grid, kept):
    """Retention 1 at the undamaged level 0 and ``kept`` at every other level: the score is ``kept``
    on every grid (chance everywhere damaged = 0, no loss = 1), as it is on a grid without level 0."""
    r = [1.0] + [kept] * (len(grid) - 1)
    assert area_score(grid, r) == pytest.approx(kept)
    assert area_score(grid[1:], r[1:]) == pytest.approx(kept)


def test_the_clean_level_counts_for_nothing_and_later_levels_keep_their_trapezoid_weights():
    # (0, 1, 2) with r = (1, 1, 0): area 0.75 of the range, 0.25 of it the floor (1 → 0 over [0, 1])
    assert area_score([0, 1, 2], [1, 1, 0]) == pytest.approx((0.75 - 0.25) / (1 - 0.25))
    assert area_score([0, 0.5, 1], [1, 0, 0]) == 0.0
    # bit widths have no undamaged level: the area is the score, as before
    assert area_score([8, 4, 2], [1, 0.5, 0], axis="descending") == pytest.approx((0.75 * 4 + 0.25 * 2) / 6)


def _table(levels_by_layer: dict[str, dict[float, float]], clean=0.9, classes=10) -> pd.DataFrame:
    """One draw of ``block_drop`` per level (:func:`tables.table`)."""
    curves = {layer: [(level, [acc]) for level, acc in accs.items()] for layer, accs in levels_by_layer.items()}
    return table(curves, clean=clean, classes=classes, perturbation="block_drop")


def test_removing_a_block_that_leaves_chance_is_critical_on_the_two_level_grid():
    """Chance is 0.1 (10 classes), clean 0.9: block 0 removed gives chance, block 1 keeps 40% of
    what the model had over chance, block 2 keeps 80%."""
    df = _table({"b0": {0.0: 0.9, 1.0: 0.1}, "b1": {0.0: 0.9, 1.0: 0.42}, "b2": {0.0: 0.9, 1.0: 0.74}})
    s = layer_scores(df).set_index("layer")
    assert s.loc["b0", "score"] == pytest.approx(0.0) and s.loc["b0", "verdict"] == "critical"
    assert s.loc["b1", "score"] == pytest.approx(0.4) and s.loc["b1", "verdict"] == "critical"
    assert s.loc["b2", "score"] == pytest.approx(0.8) and s.loc["b2", "verdict"] == "robust"


def test_the_bootstrap_interval_of_a_harmful_block_removal_lies_below_the_line():
    """With per-image outcomes (deterministic damage, one draw): a block whose removal leaves the
    model at chance gets an interval below 0.50 (critical); one that keeps 90% gets one above."""
    rng = np.random.default_rng(0)
    n, classes = 300, 10
    labels = np.arange(n) % classes
    clean = rng.random(n) < 0.9
    at_chance = rng.random(n) < 0.1
    kept = clean & (rng.random(n) < 0.95)
    rows, preds = [], []
    for layer, index, level, correct in [
        ("", -1, 0.0, clean),
        ("b0", 0, 0.0, clean),
        ("b0", 0, 1.0, at_chance),
        ("b1", 1, 0.0, clean),
        ("b1", 1, 1.0, kept),
    ]:
        add_cell(
            rows,
            preds,
            labels,
            classes,
            correct,
            model="m",
            dataset="d",
            layer=layer,
            layer_index=index,
            relative_depth=float(max(index, 0)),
            perturbation="block_drop" if layer else "clean",
            level=level,
            draw=0,
        )
    df, outcomes = with_outcomes(rows, preds, labels, "d")
    b = bootstrap(df, outcomes, replicates=200, seed=1).layers.set_index("layer")
    assert b.loc["b0", "score_high"] < 0.5 and b.loc["b0", "verdict"] == "critical"
    assert b.loc["b1", "score_low"] >= 0.5 and b.loc["b1", "verdict"] == "robust"
