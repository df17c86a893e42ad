"""Adaptive draws: more draws only where a level's mean accuracy is still uncertain; draw k is the
same cell with or without them, so the rule is deterministic, resumable and reported in the rows."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest

import lesionbench
from lesionbench.adaptive import extra_draws
from lesionbench.errors import LesionbenchError
from lesionbench.study import parse_study
from test_compare_significance import one_thread, trained  # noqa: F401 - fixtures

KEY = ["model", "layer", "perturbation", "level", "draw"]


def test_extra_draws_follow_the_t_interval():
    assert extra_draws([0.5, 0.5, 0.5], 0.02, 20) == 0  # no spread: the interval has width 0
    values = [0.50, 0.52, 0.48]  # s = 0.02: 2·t(2)·s/√3 = 0.099
    needed = math.ceil((2 * 4.302652729911275 * 0.02 / 0.02) ** 2)  # 75 at this spread
    assert extra_draws(values, 0.02, 20) == 17  # capped at max_draws
    assert extra_draws(values, 0.02, 100) == needed - 3
    assert extra_draws(values, 0.2, 20) == 0  # already narrower than a loose target
    assert extra_draws(values + [math.nan], 0.02, 20) == 16  # a failed draw counts as made, not as a value
    assert extra_draws([0.5, 0.6] * 10, 0.02, 20) == 0  # at the cap


def test_adaptive_options_are_checked_and_fingerprinted():
    base = {"models": ["m"], "draws": 5}
    with pytest.raises(LesionbenchError, match="max_draws ≥ draws"):
        parse_study(base | {"target_ci": 0.02, "max_draws": 3})
    with pytest.raises(LesionbenchError, match="target_ci"):
        parse_study(base | {"target_ci": -1.0})
    assert "target_ci" not in parse_study(base).numbers()  # off: runs made before it keep their fingerprint
    assert parse_study(base | {"target_ci": 0.02}).numbers()["target_ci"] == 0.02


def test_an_adaptive_run_is_a_fixed_run_cut_where_the_rule_says_and_resumes_to_the_same_rows(trained, tmp_path):
    net, x, y = trained
    kw = dict(model=net, data=(x, y), seed=0, draws=3, n_images=400, device="cpu", perturbations=["synapse_knockout"])
    adaptive = lesionbench.run(**kw, out=tmp_path / "a", target_ci=0.02, max_draws=8)
    fixed = lesionbench.run(**{**kw, "draws": 8})
    same = adaptive.merge(fixed, on=KEY, suffixes=("", "_fixed"))
    assert len(same) == len(adaptive) < len(fixed)  # every adaptive cell is the fixed run's cell, fewer of them
    assert (same["top1"] == same["top1_fixed"]).all() and (same["seed"] == same["seed_fixed"]).all()
    counts = adaptive[adaptive["perturbation"] != "clean"].groupby(["layer", "level"]).size()
    assert counts.max() == 8 and (counts == 3).any()  # some levels needed more draws, some did not
    for (layer, level), n in counts.items():  # the count is the rule applied to the fixed run's values
        if n == 1:
            continue
        v = fixed[(fixed["layer"] == layer) & (fixed["level"] == level)].sort_values("draw")["top1"].tolist()
        made = 3
        while (add := extra_draws(v[:made], 0.02, 8)) > 0:
            made += add
        assert n == made, (layer, level)

    # killed mid-way (rows of extra draws already written for some layers): --resume completes it
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    lines = (tmp_path / "b" / "results.csv").read_text().splitlines(keepends=True)
    (tmp_path / "b" / "results.csv").write_text("".join(lines[: len(lines) // 2]))
    resumed = lesionbench.run(**kw, out=tmp_path / "b", target_ci=0.02, max_draws=8, resume=True)
    order = lambda df: df.drop(columns=["seconds", "images_per_s"]).sort_values(KEY, ignore_index=True)  # noqa: E731
    pd.testing.assert_frame_equal(order(resumed), order(adaptive))
    _rows, outcomes = lesionbench.load_outcomes(tmp_path / "b")
    assert (_rows["outcome"] >= 0).all()
    assert np.isfinite(_rows["flip_rate"]).all()


def test_in_memory_outcomes_give_flip_rates_and_per_class_accuracy(trained):
    """``run(..., with_outcomes=True)`` with nothing written: the outcomes agree with the rows."""
    net, x, y = trained
    df, outcomes = lesionbench.run(
        model=net,
        data=(x, y),
        seed=0,
        draws=2,
        n_images=200,
        device="cpu",
        layers=["4"],
        perturbations=["node_knockout"],
        with_outcomes=True,
    )
    assert (df["outcome"] >= 0).all() and outcomes.top1.shape == (len(df), 200)
    labels = outcomes.images["label"].to_numpy()
    np.testing.assert_allclose(df["top1"], (outcomes.top1[df["outcome"]] == labels).mean(axis=1))
    clean = outcomes.top1[df.loc[df["perturbation"] == "clean", "outcome"].iloc[0]]
    np.testing.assert_allclose(df["flip_rate"], (outcomes.top1[df["outcome"]] != clean).mean(axis=1))
    assert df.loc[df["level"] == 1.0, "flip_rate"].min() > 0.5  # every unit of the last layer knocked out
    per_class = lesionbench.per_class_accuracy(df, outcomes)
    assert set(per_class["class"]) == set(range(10)) and (per_class.groupby("level")["n_images"].sum() == 200).all()
    whole = per_class[per_class["level"] == 0.5].eval("accuracy * n_images").sum() / 200
    assert whole == pytest.approx(df.loc[df["level"] == 0.5, "top1"].mean())
