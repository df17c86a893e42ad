"""Intervals from the paired bootstrap, checked on simulated studies whose true scores are known.

The simulator: image i has a difficulty u_i ~ U(0, 1) and is classified correctly when u_i exceeds
an error threshold e = 0.1 + 0.8·k·p·(1 + ε), where p is the level, k the layer's sensitivity and
ε ~ N(0, σ²) the luck of one random draw. Expected accuracy is then 0.9 − 0.8·k·p exactly (chance
0.1 with 10 classes), so the true retention is 1 − k·p, the true layer score 1 − k/2 and the true
critical level 0.5/k. Images are shared by every cell of a model (as in a real study), so the
sampling noise of the images and of the draws both enter the estimates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesionbench.bootstrapping import bootstrap, interval
from lesionbench.per_image import per_class_accuracy
from lesionbench.registry import get_registry
from lesionbench.scores import layer_scores
from lesionbench.store import Outcomes, Subset
from tables import add_cell, with_outcomes

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def simulate(
    rng,
    sensitivity: dict[str, dict[str, float]],
    n_images=400,
    draws=5,
    sigma=0.1,
    classes=10,
    shared_images=True,
    dataset="sim",
):
    """A results table (with its ``outcome`` column) and its Outcomes: models → layers → k."""
    labels = np.arange(n_images) % classes
    rows, top1 = [], []
    u_shared = rng.random(n_images)
    for model, layers in sensitivity.items():
        u = u_shared if shared_images else rng.random(n_images)

        def cell(layer, index, level, draw, threshold, u=u, model=model, layers=layers):  # this model's
            add_cell(
                rows,
                top1,
                labels,
                classes,
                u > threshold,
                level_unit="fraction p",
                images_per_s=n_images / 0.1,
                model=model,
                dataset=dataset,
                layer=layer,
                layer_index=index,
                relative_depth=index / max(1, len(layers) - 1),
                perturbation="p",
                level=level,
                draw=draw,
            )

        cell("", -1, 0.0, 0, 0.1)
        rows[-1].update(perturbation="clean", relative_depth=np.nan)
        for index, (layer, k) in enumerate(layers.items()):
            for level in LEVELS:
                for draw in range(1 if level == 0 else draws):
                    eps = 0.0 if level == 0 else rng.normal(0, sigma)
                    cell(layer, index, level, draw, 0.1 + 0.8 * k * level * (1 + eps))
    return with_outcomes(rows, top1, labels, dataset)


def true_score(k: float) -> float:
    """The area of r = 1 − k·p over [0, 1], 1 − k/2, rescaled between the grid's floor (r = 1 at 0 and
    0 at the other LEVELS: half the first step, 0.125) and 1."""
    floor = LEVELS[1] / 2
    return (1 - k / 2 - floor) / (1 - floor)


def test_intervals_cover_the_true_scores_about_95_percent_of_the_time():
    """150 simulated studies; how often the 95% interval holds the truth, for a layer score, a
    critical level and a model's overall score; and the bootstrap spread against the true spread
    (the standard deviation of the estimates over the 150 studies)."""
    rng = np.random.default_rng(1)
    k = {"a": 0.7, "b": 0.3}
    hits = {"score": 0, "critical": 0, "overall": 0}
    estimates, widths = [], []
    n = 150
    for _ in range(n):
        df, outcomes = simulate(rng, {"m": k})
        b = bootstrap(df, outcomes, replicates=400, seed=int(rng.integers(1 << 31)))
        a = b.layers.set_index("layer").loc["a"]
        hits["score"] += a.score_low <= true_score(0.7) <= a.score_high
        hits["critical"] += a.critical_low <= 0.5 / 0.7 <= a.critical_high
        o = b.overall("sim", ["p"]).iloc[0]
        hits["overall"] += o.low <= (true_score(0.7) + true_score(0.3)) / 2 <= o.high
        estimates.append(a.score)
        widths.append(np.std(b.score_reps[b.layers.index[b.layers["layer"] == "a"][0]]))
    for what, count in hits.items():
        assert 0.90 <= count / n <= 0.99, (what, count / n)
    true_spread = np.std(estimates)
    assert 0.8 < np.mean(widths) / true_spread < 1.25, (np.mean(widths), true_spread)


def hand_area_score(df: pd.DataFrame, layer: str) -> float:
    """The area score of one layer written out from its definition, independently of lesionbench:
    mean top-1 over draws per level, retention (acc − 0.1) / (clean − 0.1) clipped to [0, 1],
    trapezoids over the levels, divided by the range, rescaled between the floor of the grid (r = 1 at
    level 0, 0 elsewhere: half its first step) and 1."""
    clean = float(df.loc[df["perturbation"] == "clean", "top1"].iloc[0])
    mine = df[df["layer"] == layer]
    levels = sorted(set(mine["level"]))
    r = [min(1.0, max(0.0, (mine.loc[mine["level"] == x, "top1"].mean() - 0.1) / (clean - 0.1))) for x in levels]
    area = sum((levels[i + 1] - levels[i]) * (r[i] + r[i + 1]) / 2 for i in range(len(levels) - 1))
    span = levels[-1] - levels[0]
    floor = (levels[1] - levels[0]) / 2 / span if levels[0] == 0 else 0.0
    return (area / span - floor) / (1 - floor)


def test_point_estimates_are_the_defined_score_and_intervals_hold_them():
    df, outcomes = simulate(np.random.default_rng(0), {"m": {"a": 0.7, "b": 0.3, "c": 1.0}})
    b = bootstrap(df, outcomes, replicates=300)
    for r in b.layers.itertuples():
        assert r.score == pytest.approx(hand_area_score(df, r.layer), abs=1e-12)
    # verdicts from the intervals: critical below 0.50, robust above, undetermined across
    for r in b.layers.itertuples():
        expected = "critical" if r.score_high < 0.495 else "robust" if r.score_low >= 0.505 else r.verdict
        assert r.verdict == expected and (r.verdict != "undetermined" or r.score_low < 0.5 <= r.score_high + 0.005)
    assert (b.layers["score_low"] <= b.layers["score"]).all() and (b.layers["score"] <= b.layers["score_high"]).all()
    c = b.curves[b.curves["level"] > 0]
    assert ((c["band_low"] <= c["mean"]) & (c["mean"] <= c["band_high"]) & (c["band_high"] > c["band_low"])).all()
    assert np.isinf(b.layers.set_index("layer").loc["b", "critical_high"])  # retention 0.7 at the end: never reached


def test_same_seed_same_intervals_and_more_images_narrower_intervals():
    """Without draw noise, eight times the images: intervals about √8 ≈ 2.8 times narrower."""
    df, outcomes = simulate(np.random.default_rng(0), {"m": {"a": 0.7}}, sigma=0.0)
    one, two = bootstrap(df, outcomes, replicates=200, seed=3), bootstrap(df, outcomes, replicates=200, seed=3)
    np.testing.assert_array_equal(one.score_reps, two.score_reps)
    big = simulate(np.random.default_rng(0), {"m": {"a": 0.7}}, n_images=3200, sigma=0.0)
    wide = one.layers.iloc[0]
    narrow = bootstrap(*big, replicates=200, seed=3).layers.iloc[0]
    assert (narrow.score_high - narrow.score_low) < 0.6 * (wide.score_high - wide.score_low)


def test_models_that_cannot_be_told_apart_share_a_rank():
    """Two models with the same true curves (own draws, shared images) tie; a worse one is third."""
    df, outcomes = simulate(np.random.default_rng(4), {"x": {"a": 0.5}, "y": {"a": 0.5}, "z": {"a": 0.95}})
    ranked = bootstrap(df, outcomes, replicates=400).overall("sim", ["p"]).set_index("model")
    assert ranked.loc["x", "rank"] == ranked.loc["y", "rank"] == 1
    assert ranked.loc["z", "rank"] == 3
    assert ranked.loc["z", "high"] < ranked.loc["x", "low"]


def test_shared_images_make_the_difference_of_two_models_precise():
    """The same images under two models: the paired difference is far narrower than either interval."""
    rng = np.random.default_rng(5)
    paired = bootstrap(*simulate(rng, {"x": {"a": 0.5}, "y": {"a": 0.55}}, sigma=0.0), replicates=400)
    unpaired = bootstrap(
        *simulate(rng, {"x": {"a": 0.5}, "y": {"a": 0.55}}, sigma=0.0, shared_images=False), replicates=400
    )

    def width(b):
        low, high = interval(b.overall_reps("x", "sim", ["p"]) - b.overall_reps("y", "sim", ["p"]))
        return high - low

    assert width(paired) < 0.5 * width(unpaired)


def test_models_without_outcomes_get_no_interval_but_keep_their_scores():
    df, outcomes = simulate(np.random.default_rng(0), {"old": {"a": 0.5}, "new": {"a": 0.5}})
    df.loc[df["model"] == "old", "outcome"] = -1
    b = bootstrap(df, outcomes, replicates=100).layers.set_index("model")
    assert np.isnan(b.loc["old", "score_low"]) and np.isfinite(b.loc["new", "score_low"])
    assert b.loc["old", "score"] == pytest.approx(b.loc["new", "score"], abs=0.2)


def test_an_older_run_of_one_perturbation_leaves_the_models_other_perturbations_their_intervals():
    """The Fashion-MNIST track's situation: the paper's perturbations re-run with outcomes, a study
    of another perturbation from before outcomes were kept (its own clean row without them)."""
    df, outcomes = simulate(np.random.default_rng(0), {"m": {"a": 0.5, "b": 0.2}})
    old = df[df["perturbation"] != "clean"].assign(perturbation="q", outcome=-1)
    old_clean = df[df["perturbation"] == "clean"].assign(outcome=-1)
    mixed = pd.concat([old_clean, df, old], ignore_index=True)  # the old run's clean row comes first
    b = bootstrap(mixed, outcomes, replicates=100).layers.set_index(["perturbation", "layer"])
    assert np.isfinite(b.loc[("p", "a"), "score_low"]) and np.isfinite(b.loc[("p", "b"), "score_low"])
    assert np.isnan(b.loc[("q", "a"), "score_low"]) and np.isnan(b.loc[("q", "b"), "score_low"])
    alone = bootstrap(df, outcomes, replicates=100).layers.set_index(["perturbation", "layer"])
    assert b.loc[("p", "a"), "score_low"] == alone.loc[("p", "a"), "score_low"]


def test_per_class_accuracy_finds_the_class_a_damage_hurts():
    """Damage that only misclassifies class 3: its accuracy falls, the others' stay."""
    df, outcomes = simulate(np.random.default_rng(0), {"m": {"a": 0.0}}, n_images=200, draws=2)
    labels = outcomes.images["label"].to_numpy()
    damaged = df.index[(df["level"] == 1.0)]
    for i in damaged:
        row = df.loc[i, "outcome"]
        outcomes.top1[row, labels == 3] = 4
    pc = per_class_accuracy(df, outcomes)
    full = pc[pc["level"] == 1.0].set_index("class")
    assert full.loc[3, "accuracy"] == 0.0 and full.loc[3, "retention"] == 0.0
    rest = full.drop(index=3)
    assert (rest["accuracy"] == rest["clean"]).all() and (rest["retention"] == 1.0).all()  # k = 0: untouched
    assert (full["n_images"] == 20).all()
    assert full.loc[3, "clean"] == pytest.approx(outcomes.top1[0][labels == 3].tolist().count(3) / 20)


def test_runs_of_one_model_on_other_images_of_the_same_number_are_refused():
    """Two runs of a model, 200 images each, with the same predictions (so the same clean accuracy,
    which the count-and-accuracy check cannot tell apart), but on different images of the dataset:
    their outcomes say so, and the bootstrap refuses instead of pooling them. On the same images,
    the same two runs are accepted."""
    from lesionbench.errors import LesionbenchError

    df, outcomes = simulate(np.random.default_rng(0), {"m": {"a": 0.5}}, n_images=200, draws=2)
    labels = outcomes.images["label"].to_numpy()
    keys, t1 = outcomes.keys, outcomes.top1

    def two_runs(second_indices):
        parts = [
            (keys, t1, t1 == labels, Subset("sim", "test", np.arange(200), labels)),
            (keys, t1, t1 == labels, Subset("sim", "test", second_indices, labels)),
        ]
        both = pd.concat([df, df.assign(outcome=df["outcome"] + len(df))], ignore_index=True)
        return both, Outcomes.from_runs(parts)

    with pytest.raises(
        LesionbenchError, match=r"'m' on dataset 'sim'.*different images \(200, 200 images, 100 in common\)"
    ):
        bootstrap(*two_runs(np.arange(100, 300)), replicates=50)
    same = bootstrap(*two_runs(np.arange(200)), replicates=50)
    assert same.has_interval("m")


@pytest.mark.parametrize("score", sorted(get_registry().contributions("scores")))
def test_the_point_estimate_is_the_bootstraps_identity_replicate_for_every_registered_score(score):
    """A replicate that resamples nothing (every image once, every draw once) goes through the
    bootstrap's whole pipeline — accuracies recomputed from the per-image outcomes, curves, retention,
    the score and the critical level per replicate — and must land on the point estimate, which is
    computed from the results table's accuracies."""
    df, outcomes = simulate(np.random.default_rng(4), {"m": {"a": 0.7, "b": 0.3}, "n": {"a": 1.0, "b": 0.1}})
    point = layer_scores(df, score=score)
    b = bootstrap(df, outcomes, replicates=3, score=score, resample="identity")
    assert b.score == score and len(b.layers) == len(point) == 4
    np.testing.assert_allclose(
        b.score_reps, np.repeat(point["score"].to_numpy()[:, None], 3, axis=1), rtol=0, atol=1e-6
    )
    for column in ("critical_low", "critical_high"):
        np.testing.assert_allclose(b.layers[column], point["critical_level"], rtol=1e-6)
    random = bootstrap(df, outcomes, replicates=50, score=score)  # and a real resample does move it
    assert (random.score_reps.std(axis=1) > 0).all()
