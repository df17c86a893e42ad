"""Per-image measures of a results table with its outcomes: which images a run evaluated (the exact
check that a model's runs share their images) and the accuracy per class.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lesionbench.scores import GROUP, _mixed_runs, chance_level, retention
from lesionbench.store import CLEAN, NONFINITE, Outcomes


def _check_same_images(df: pd.DataFrame, outcomes: Outcomes, metric: str) -> None:
    """Refuse a model whose runs on one dataset kept outcomes for different images: the exact form of
    :func:`_check_one_clean_evaluation`, which sees only counts and accuracies (two subsets of one
    size can have one clean accuracy).

    Raises:
        LesionbenchError: naming the model, the dataset and how many images the runs share.
    """
    if "outcome" not in df.columns:
        return
    clean = df[(df["perturbation"] == CLEAN) & (df["outcome"] >= 0)]
    for (model, dataset), runs in clean.groupby(["model", "dataset"]):
        if len(runs) < 2:
            continue
        evaluated = _hits(outcomes, runs["outcome"].to_numpy(), metric)[1]
        if not (evaluated == evaluated[0]).all():
            counts = ", ".join(str(int(n)) for n in evaluated.sum(axis=1))
            raise _mixed_runs(
                model,
                dataset,
                f"has runs evaluated on different images ({counts} images, "
                f"{int(evaluated.all(axis=0).sum())} in common)",
            )


def _hits(outcomes: Outcomes, rows: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """For outcome rows ``rows``: (hit [rows, images] bool, evaluated [rows, images] bool).

    A text window's column (``tokens`` T > 1 in ``outcomes.images``) counts instead: hit is its
    number of top-k hits and evaluated T (int64), so that a sum of hits over a sum of evaluated
    (weighted or not) is the accuracy per token and a resampled column is a whole window."""
    top1 = outcomes.top1[rows]
    evaluated = top1 >= 0
    if metric == "top1":
        hit = top1 == outcomes.images["label"].to_numpy()[None, :]
    else:
        hit = outcomes.top5[rows].astype(bool)
    tokens = outcomes.images["tokens"].to_numpy() if "tokens" in outcomes.images.columns else None
    if tokens is None or not (tokens > 1).any():
        return hit & evaluated, evaluated
    counted = (tokens > 1)[None, :]
    counts = top1 if metric == "top1" else outcomes.top5[rows]
    hit = np.where(counted, counts, hit).astype(np.int64) * evaluated
    return hit, evaluated * tokens.astype(np.int64)[None, :]


def per_class_accuracy(df: pd.DataFrame, outcomes: Outcomes, metric: str = "top1") -> pd.DataFrame:
    """Accuracy on each class of the evaluation subset, per model × layer × perturbation × level.

    ``df`` is a results table with the ``outcome`` column that
    :func:`lesionbench.store.read_results_with_outcomes` (or ``lesionbench.load_outcomes``) adds,
    ``outcomes`` the per-image outcomes it points into. Returns one row per model × layer ×
    perturbation × level × class with ``class`` (int, the label), ``n_images`` (images of that
    class evaluated), ``accuracy`` (``metric`` on that class, mean over draws; a cell with
    non-finite logits is scored as measured, its NaN/Inf images counted wrong), ``clean`` (the undamaged model's
    accuracy on the class) and ``retention`` (clip((accuracy − chance) / (clean − chance), 0, 1),
    the per-class analogue of the retention curve; 0 where the clean model is at chance on the
    class). Rows without outcomes (runs made before they were kept, failed cells) are left out.
    Sorted by model, perturbation, layer_index, level, class.

    Per-class accuracy under damage is how "which classes are hurt most" is read (e.g. Hooker et
    al. 2019, *What do compressed deep neural networks forget?*, who compare per-class recall of
    pruned and dense models).
    """
    out_cols = GROUP + ["level", "class", "n_images", "accuracy", "clean", "retention"]
    if "outcome" not in df.columns or len(outcomes) == 0:
        return pd.DataFrame(columns=out_cols)
    error = df["error"].fillna("")
    usable = (df["outcome"] >= 0) & ((error == "") | (error == NONFINITE))
    clean = df[usable & (df["perturbation"] == CLEAN)].drop_duplicates(["model", "dataset"])
    cells = df[usable & (df["perturbation"] != CLEAN)]
    if cells.empty or clean.empty:
        return pd.DataFrame(columns=out_cols)
    labels = outcomes.images["label"].to_numpy()
    classes = np.unique(labels)
    onehot = (labels[:, None] == classes[None, :]).astype(np.float64)  # [images, classes]

    def by_class(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        hit, evaluated = _hits(outcomes, rows["outcome"].to_numpy(), metric)
        n = evaluated.astype(np.float64) @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            return hit.astype(np.float64) @ onehot / n, n

    acc, n = by_class(cells)
    long = cells[GROUP + ["level"]].loc[cells.index.repeat(len(classes))].reset_index(drop=True)
    long["class"] = np.tile(classes, len(cells))
    long["n_images"] = n.ravel()
    long["accuracy"] = acc.ravel()
    long = long[long["n_images"] > 0]
    out = (
        long.groupby(GROUP + ["level", "class"], sort=True)
        .agg(n_images=("n_images", "first"), accuracy=("accuracy", "mean"))
        .reset_index()
    )
    clean_acc, _ = by_class(clean)
    ref = pd.DataFrame(
        {
            "model": clean["model"].repeat(len(classes)).to_numpy(),
            "dataset": clean["dataset"].repeat(len(classes)).to_numpy(),
            "class": np.tile(classes, len(clean)),
            "clean": clean_acc.ravel(),
            "chance": np.repeat([chance_level(metric, int(k)) for k in clean["num_classes"]], len(classes)),
        }
    )
    out = out.merge(ref, on=["model", "dataset", "class"], how="left")
    out["retention"] = retention(out["accuracy"], out["clean"], out["chance"])
    out["n_images"] = out["n_images"].astype(int)
    return out.drop(columns="chance").sort_values(
        ["model", "perturbation", "layer_index", "level", "class"], ignore_index=True
    )[out_cols]
