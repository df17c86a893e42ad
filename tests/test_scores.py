"""Scores are pure functions of a results table: checked on hand-made tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lesionbench.scores import area_score, chance_level, critical_level, curves, layer_scores, model_summary, retention
from tables import table


def test_chance_is_k_over_classes():
    assert chance_level("top1", 10) == 0.1
    assert chance_level("top5", 1000) == 0.005
    assert chance_level("top5", 3) == 1.0


def test_retention_rescales_clean_to_one_and_chance_to_zero_and_clips():
    r = retention([0.9, 0.5, 0.1, 0.05, 0.95], 0.9, 0.1)
    assert r.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0, 1.0])


def test_area_score_is_the_normalised_area_rescaled_between_the_grids_extremes():
    assert area_score([0, 1], [1, 1]) == 1.0
    assert area_score([0, 1], [1, 0]) == 0.0  # the raw area, (1 + 0)/2, would be 0.5
    assert area_score([0, 0.5, 1], [1, 0, 0]) == 0.0
    # raw area 1.5 / 2 (divided by the range); the floor, r = (1, 0, 0), is 0.5 / 2
    assert area_score([0, 1, 2], [1, 1, 0]) == pytest.approx((0.75 - 0.25) / (1 - 0.25))
    assert area_score([0.5, 1], [1, 0]) == pytest.approx(0.5)  # no undamaged level: the area as it is


def test_critical_level_interpolates_and_is_inf_when_never_reached():
    assert critical_level([0, 0.5, 1.0], [1.0, 0.8, 0.2]) == pytest.approx(0.5 + 0.5 * (0.3 / 0.6))
    assert critical_level([0, 1], [1, 0.6]) == math.inf
    assert critical_level([0, 1], [1, 0.5]) == 1.0


def test_layer_scores_on_a_hand_made_table():
    df = table(
        {
            "conv1": [(0.0, [0.9]), (0.5, [0.1, 0.1]), (1.0, [0.1, 0.1])],  # chance at once
            "fc8": [(0.0, [0.9]), (0.5, [0.9, 0.9]), (1.0, [0.5, 0.5])],  # halfway at the end
        }
    )
    s = layer_scores(df).set_index("layer")
    assert s.loc["conv1", "score"] == pytest.approx(0.0)  # chance at every damaged level
    assert s.loc["conv1", "critical_level"] == pytest.approx(0.25)
    assert s.loc["conv1", "verdict"] == "critical"
    raw, floor = (1 + 1) / 2 * 0.5 + (1 + 0.5) / 2 * 0.5, 0.5 / 2  # floor: r = (1, 0, 0)
    assert s.loc["fc8", "score"] == pytest.approx((raw - floor) / (1 - floor))
    assert s.loc["fc8", "critical_level"] == 1.0
    assert s.loc["fc8", "verdict"] == "robust"
    summary = model_summary(layer_scores(df)).iloc[0]
    assert summary.weakest_layer == "conv1"
    assert summary.first_layer_score == pytest.approx(0.0)
    assert summary.last_layer_score == pytest.approx(5 / 6)
    assert summary.mean_score == pytest.approx((0.0 + 5 / 6) / 2)


def test_curves_give_relative_drop_and_a_t_interval():
    df = table({"conv1": [(0.0, [0.8]), (1.0, [0.3, 0.5, 0.4])]}, clean=0.8)
    c = curves(df).set_index("level")
    assert c.loc[1.0, "mean"] == pytest.approx(0.4)
    assert c.loc[1.0, "relative_drop"] == pytest.approx((0.4 - 0.8) / 0.8)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) · s / √n
    assert c.loc[1.0, "ci_low"] == pytest.approx(0.4 - half)
    assert c.loc[1.0, "ci_high"] == pytest.approx(0.4 + half)
    assert c.loc[0.0, "ci_low"] == c.loc[0.0, "ci_high"] == pytest.approx(0.8)


def test_failed_cells_are_left_out_of_scores():
    df = table({"conv1": [(0.0, [0.9]), (1.0, [0.9, 0.9])]})
    bad = df.iloc[-1].copy()
    bad["top1"], bad["error"] = 0.0, "RuntimeError: boom"
    df = pd.concat([df, bad.to_frame().T], ignore_index=True)
    df["top1"] = df["top1"].astype(float)
    assert layer_scores(df).iloc[0]["score"] == pytest.approx(1.0)


def test_log_levels_count_every_decade_the_same_and_leave_out_level_zero():
    """Bit error rates 1e-7…1e-3: a collapse in the last decade costs a quarter of the score, not
    (as on a linear axis) almost nothing."""
    points = [(0.0, [0.9]), (1e-7, [0.9]), (1e-6, [0.9]), (1e-5, [0.9]), (1e-4, [0.9]), (1e-3, [0.1])]
    df = table({"conv1": points})
    linear = layer_scores(df).iloc[0]
    df["level_axis"] = "log"
    log = layer_scores(df).iloc[0]
    assert log["score"] == pytest.approx(7 / 8)  # trapezoids over 4 decades, the last one half lost
    floor = 0.5e-7 / 1e-3  # r = 1 at 0, 0 from 1e-7 on
    assert linear["score"] == pytest.approx((0.55 - floor) / (1 - floor))  # the last decade is 90% of the range
    assert log["critical_level"] == pytest.approx(10**-3.5)  # halfway through the last decade
    assert log["max_level"] == pytest.approx(1e-3)


def test_descending_levels_read_bits_from_many_to_few():
    """Quantisation: 8 bits is mild, 2 bits is the most damage; p½ is found going down in bits."""
    points = [(8.0, [0.9]), (6.0, [0.9]), (4.0, [0.5]), (2.0, [0.1])]
    df = table({"conv1": points, "fc": [(8.0, [0.9]), (2.0, [0.9])]})
    df["level_axis"] = "descending"
    s = layer_scores(df).set_index("layer")
    assert s.loc["conv1", "critical_level"] == pytest.approx(4.0)
    assert s.loc["conv1", "score"] == pytest.approx((2 * 1 + 2 * 0.75 + 2 * 0.25) / 6)
    assert math.isinf(s.loc["fc", "critical_level"]) and s.loc["fc", "max_level"] == 2.0
    from lesionbench.leaderboard import format_critical

    assert format_critical(s.loc["fc", "critical_level"], 2.0, "descending") == "< 2"


def test_runs_of_one_model_on_different_images_are_refused_not_scored_against_one_clean_accuracy():
    """Two runs of a model on one dataset whose clean rows disagree (100 images against 500, as the
    ImageNet runs were before they were re-run): scoring either against the other's clean accuracy
    would shift every retention, so the table is refused, naming both evaluations."""
    from lesionbench.errors import LesionbenchError

    small = table({"conv1": [(0.0, [0.85]), (1.0, [0.5])]}, clean=0.85).assign(n_images=100)
    large = table({"fc8": [(0.0, [0.88]), (1.0, [0.5])]}, clean=0.882).assign(n_images=500)
    with pytest.raises(LesionbenchError, match=r"'m' on dataset 'd'.*100 images on \?, clean top1 0\.8500; 500 images"):
        layer_scores(pd.concat([small, large], ignore_index=True))
    # either difference alone is enough: as many images but another accuracy (another subset, or a
    # device whose numerics flip a prediction), or another number of images at the same accuracy
    other_device = large.assign(n_images=100, device="cuda")
    with pytest.raises(
        LesionbenchError, match=r"100 images on cpu, clean top1 0\.8500; 100 images on cuda, clean top1 0\.8820"
    ):
        layer_scores(pd.concat([small.assign(device="cpu"), other_device], ignore_index=True))
    with pytest.raises(
        LesionbenchError, match=r"100 images on \?, clean top1 0\.8500; 500 images on \?, clean top1 0\.8500"
    ):
        layer_scores(
            pd.concat([small, large.assign(top1=lambda d: d["top1"].where(d["perturbation"] != "clean", 0.85))])
        )
    # the same evaluation in two runs (as the Fashion-MNIST runs share their images) scores as one
    same = table({"fc8": [(0.0, [0.85]), (1.0, [0.5])]}, clean=0.85).assign(n_images=100)
    scores = layer_scores(pd.concat([small, same], ignore_index=True)).set_index("layer")
    assert scores.loc["fc8", "score"] == pytest.approx((0.5 - 0.1) / 0.75)  # retention at its one damaged level


def test_verdicts_follow_the_interval_and_fall_back_to_the_score_without_one():
    from lesionbench.scores import verdict

    assert verdict(0.51, 0.47, 0.56) == "undetermined"  # the committed fashion_alexnet conv1 case
    assert verdict(0.45, 0.40, 0.53) == "undetermined"
    assert verdict(0.60, 0.50, 0.70) == "robust"  # 0.50 printed is not below the line
    assert verdict(0.45, 0.40, 0.49) == "critical"
    assert verdict(0.51) == "robust" and verdict(0.494) == "critical"


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), summed exactly: the oracle of the chance test."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("clean", [0.0, 0.1, 0.11, 0.12, 0.13, 0.2])
def test_a_model_whose_clean_accuracy_is_not_beyond_chance_is_not_scored(clean):
    from lesionbench.scores import at_chance

    df = table({"a": [(0.0, [clean]), (1.0, [0.1, 0.1])]}, clean=clean)
    df["n_images"] = 500
    expected_at_chance = _binomial_tail(round(clean * 500), 500, 0.1) >= 0.05
    assert (len(at_chance(df)) == 1) == expected_at_chance
    assert layer_scores(df).empty == expected_at_chance
    assert expected_at_chance == (clean <= 0.12)  # 0.12 on 500: P = 0.078; 0.13: P = 0.016
