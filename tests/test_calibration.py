"""The bootstrap's 95% intervals hold the known truth of simulated studies at the draw counts the
committed tracks use (2 draws, realistic draw-to-draw spread): see lesionbench.calibration, and
perf/calibration.py for the full table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import ndtr

from conftest import needs_fashion_mnist
from lesionbench.calibration import SLOPES, SPREADS, run, simulate, truth
from lesionbench.scores import layer_scores


def test_two_draws_with_realistic_spread_cover_the_truth_and_rarely_split_equals():
    r = run(1000, draws=2, spread=SPREADS["realistic"], studies=100, replicates=300, seed=7)
    for what in ("fragile", "middle", "twin", "robust", "overall", "difference"):
        assert r[f"cover_{what}"] >= 0.92, (what, r)
    assert r["equal_models_split"] <= 0.08 and r["equal_layers_split"] <= 0.08, r
    assert r["largest_gap"] > 0.3  # the draws really do differ as much as on the ImageNet track


def test_the_truth_is_what_many_images_and_draws_converge_to():
    """An independent check of :func:`truth`: one study with 5,000 images and 100 draws scores
    within 0.025 of it (its own sampling error is about 0.01)."""
    rng = np.random.default_rng(0)
    df, _ = simulate(rng, classes=10, draws=100, spread=SPREADS["realistic"], n_images=5_000, models=("A",))
    scores = layer_scores(df).set_index("layer")["score"]
    true = truth(10, SPREADS["realistic"])
    for layer in SLOPES:
        assert abs(scores[layer] - true[layer]) < 0.025, (layer, scores[layer], true[layer])
    assert true["fragile"] < true["middle"] == true["twin"] < true["robust"]
    clean = 0.1 + 0.9 * ndtr(1 / np.sqrt(2))
    assert abs(df.loc[df["perturbation"] == "clean", "top1"].iloc[0] - clean) < 0.01


@pytest.mark.slow
@needs_fashion_mnist()
def test_the_seed_gate_benchmark_runs(tmp_path):
    """perf/seed_gate.py with one re-run: the conv1-noise model fails the gate, the re-run passes it."""
    script = Path(__file__).resolve().parents[1] / "perf" / "seed_gate.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "gate"), "--reruns", "1"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "compare damaged base → 1 " in done.stdout, done.stdout  # the real regression is caught
    assert "seed 1: compare rerun base → 0, compare base rerun → 0" in done.stdout, done.stdout  # no false alarm
