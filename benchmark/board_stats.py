"""The numbers behind the leaderboard, from a results table: clean facts, level grids, which
perturbations rank a track, ranks with ties from the bootstrap, study time, fragile layers.

:func:`lesionbench.leaderboard.build_leaderboard` assembles them into :mod:`lesionbench.board`'s
data; nothing here writes text.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from lesionbench.layer_score import DEFAULT_SCORE
from lesionbench.scores import BOOTSTRAP_SEED, REPLICATES, Bootstrap, bootstrap, clean_accuracy, interval
from lesionbench.store import CLEAN, Outcomes

MAX_COLUMNS = 3  # perturbations per layer table (each takes a score and a p½ column)


def model_facts(df: pd.DataFrame) -> pd.DataFrame:
    """Per model × dataset: clean top-1/top-5, full-pass throughput, device and images (from the
    clean evaluation; the fastest when several studies ran the model)."""
    clean1 = clean_accuracy(df, "top1").rename(columns={"clean": "clean_top1"}).drop(columns="chance")
    clean5 = clean_accuracy(df, "top5").rename(columns={"clean": "clean_top5"}).drop(columns="chance")
    clean = df[df["perturbation"] == CLEAN].sort_values("images_per_s", ascending=False, kind="stable")
    # several studies of one model: the fastest clean pass, as timeit takes the best of its repeats
    clean = clean.drop_duplicates(["model", "dataset"])[["model", "dataset", "images_per_s", "device", "n_images"]]
    return clean1.merge(clean5, on=["model", "dataset"]).merge(clean, on=["model", "dataset"])


def level_grids(scores_df: pd.DataFrame) -> pd.DataFrame:
    """Per model × perturbation of a results table: its level grid (a tuple of the levels run)."""
    cells = scores_df[scores_df["perturbation"] != CLEAN]
    grids = cells.groupby(["model", "perturbation"])["level"].agg(lambda v: tuple(sorted(set(float(x) for x in v))))
    return grids.rename("grid").reset_index()


def evaluation_seconds(cells: pd.DataFrame, clean: pd.DataFrame) -> float:
    """Seconds spent evaluating ``cells`` (rows of one model that did not fail).

    A level that leaves the network as it is (level 0 of a knockout) is not evaluated: its row is
    the clean pass's. Runs now record 0 s for it; older ones (before 2026-11-30) copied the clean pass's
    seconds (of the pass the run made when it started or resumed) into each such row, which counted
    one clean pass per layer × perturbation again; so a level-0 row whose top-1, top-5 and loss equal
    a clean row's of the model exactly is left out too."""
    ok = cells[cells["error"].fillna("") == ""]
    same = [c for c in ("top1", "top5", "loss") if c in ok.columns and c in clean.columns]
    copied = pd.MultiIndex.from_frame(ok[same]).isin(pd.MultiIndex.from_frame(clean[same]))
    reused = copied & (ok["level"] == 0.0).to_numpy()
    return float(ok.loc[~reused, "seconds"].sum())


def draws_range(df: pd.DataFrame) -> list[int] | None:
    """(fewest, most) draws behind a level of random damage (levels drawn once when none is
    drawn more); None for a table with no damaged cells."""
    counts = df[df["perturbation"] != CLEAN].groupby(["layer", "perturbation", "level"]).size()
    if counts.empty:
        return None
    spread = counts[counts > 1] if (counts > 1).any() else counts
    return [int(spread.min()), int(spread.max())]


def track_bootstraps(
    df: pd.DataFrame,
    outcomes: Outcomes | None,
    metrics: Mapping[str, str] | None = None,
    replicates: int = REPLICATES,
    seed: int = BOOTSTRAP_SEED,
    score: str = DEFAULT_SCORE,
) -> dict[str, Bootstrap]:
    """One bootstrap per track (dataset) that has per-image outcomes, with the track's metric and
    the layer score ``score`` (a registered score's name)."""
    if outcomes is None or len(outcomes) == 0 or "outcome" not in df.columns or not (df["outcome"] >= 0).any():
        return {}
    metrics = dict(metrics or {})
    out = {}
    for dataset, dg in df.groupby("dataset", sort=True):
        if (dg["outcome"] >= 0).any():
            out[dataset] = bootstrap(dg, outcomes, metrics.get(dataset, "top1"), replicates, seed, score=score)
    return out


def ranked_perturbations(dg: pd.DataFrame, scores: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """(ranked, not run on every model, run on different grids): the perturbations of one track that
    every model was studied under with the same level grid, and those left out of the ranking."""
    models = scores["model"].unique()
    grids = level_grids(dg)
    shared, partial, regridded = [], [], []
    for p in sorted(scores["perturbation"].unique()):
        g = grids[grids["perturbation"] == p]
        if len(g) < len(models):
            partial.append(p)
        elif g["grid"].nunique() > 1:
            regridded.append(p)
        else:
            shared.append(p)
    return shared, partial, regridded


def ranking(
    boot: Bootstrap | None, scores: pd.DataFrame, dataset: str, shared: list[str], models: list[str]
) -> pd.DataFrame:
    """model, overall, low, high, rank: with ties from the bootstrap, or by the point value."""
    if not models:  # every model at chance: none scored
        return pd.DataFrame(columns=["model", "overall", "low", "high", "rank"])
    if boot is not None and shared:
        return boot.overall(dataset, shared, models)
    s = scores[scores["perturbation"].isin(shared)]
    overall = {
        m: float(s[s["model"] == m].groupby("perturbation")["score"].mean().mean()) if shared else float("nan")
        for m in models
    }
    out = pd.DataFrame({"model": models, "overall": [overall[m] for m in models], "low": np.nan, "high": np.nan})
    out = out.sort_values("overall", ascending=False, ignore_index=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


def mean_score(
    boot: Bootstrap | None, mine: pd.DataFrame, model: str, dataset: str, p: str
) -> tuple[float, float, float]:
    """A model's mean layer score under one perturbation, with its interval when there is one."""
    value = float(mine.loc[mine["perturbation"] == p, "score"].mean())
    if boot is None:
        return value, float("nan"), float("nan")
    low, high = interval(boot.overall_reps(model, dataset, [p]))
    return value, low, high


def depth_thirds(g: pd.DataFrame) -> list[float]:
    """Mean layer score of the first, middle and last third of the studied layers (by relative depth)."""
    third = np.minimum((g["relative_depth"].fillna(0.0) * 3).astype(int), 2)
    return [g.loc[third == t, "score"].mean() for t in range(3)]


def most_fragile_layers(scores: pd.DataFrame) -> pd.DataFrame:
    """Per model × perturbation the layer with the lowest layer score (ties: the earlier layer), the
    layer a model page names first: columns model, perturbation, layer, layer_index, score."""
    g = scores.sort_values(["model", "perturbation", "score", "layer_index"], kind="stable")
    return g.drop_duplicates(["model", "perturbation"])[["model", "perturbation", "layer", "layer_index", "score"]]


def images_per_class(per_class: pd.DataFrame) -> tuple[int, int]:
    """(fewest, most) images of one class behind a per-class table; (0, 0) when it is empty."""
    per_image = per_class.groupby(["model", "class"])["n_images"].max()
    return (int(per_image.min()), int(per_image.max())) if len(per_image) else (0, 0)


def layer_groups(scores: pd.DataFrame) -> list[list[str]]:
    """The perturbations of one model grouped by the set of layers each studied, at most
    :data:`MAX_COLUMNS` to a group: one narrow table each, with no empty cells."""
    by_layers: dict[tuple, list[str]] = {}
    for p, g in scores.groupby("perturbation", sort=True):
        by_layers.setdefault(tuple(sorted(g["layer"])), []).append(p)
    groups = []
    for _layers, ps in sorted(by_layers.items(), key=lambda kv: (-len(kv[0]), kv[1])):
        groups += [ps[i : i + MAX_COLUMNS] for i in range(0, len(ps), MAX_COLUMNS)]
    return groups
