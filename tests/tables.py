"""Results tables made by hand, for the tests of the scores and the bootstrap.

* :func:`table`: the columns the point scores read, a clean row and each layer's curve (per level,
  an accuracy per draw);
* :func:`add_cell` and :func:`with_outcomes`: rows that carry per-image outcomes (an ``outcome``
  column) and the :class:`~lesionbench.store.Outcomes` holding those images' predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lesionbench.store import Outcomes, Subset


def table(
    curves_by_layer: dict[str, list[tuple[float, list[float]]]],
    clean=0.9,
    classes=10,
    metric="top1",
    perturbation="p",
) -> pd.DataFrame:
    """A results table: clean row + per layer (level, [acc per draw]) of ``perturbation``."""
    rows = [
        dict(
            model="m",
            dataset="d",
            layer="",
            layer_index=-1,
            relative_depth=np.nan,
            perturbation="clean",
            level=0.0,
            draw=0,
            top1=clean,
            top5=clean,
            num_classes=classes,
            error="",
        )
    ]
    for i, (layer, points) in enumerate(curves_by_layer.items()):
        for level, accs in points:
            for d, a in enumerate(accs):
                rows.append(
                    dict(
                        model="m",
                        dataset="d",
                        layer=layer,
                        layer_index=i,
                        relative_depth=i / max(1, len(curves_by_layer) - 1),
                        perturbation=perturbation,
                        level=level,
                        draw=d,
                        top1=a,
                        top5=a,
                        num_classes=classes,
                        error="",
                    )
                )
    return pd.DataFrame(rows)


def add_cell(
    rows: list[dict],
    predictions: list[np.ndarray],
    labels: np.ndarray,
    classes: int,
    correct: np.ndarray,
    level_unit: str = "",
    images_per_s: float = 1.0,
    **keys,
) -> None:
    """Append a cell that classifies image i right where ``correct[i]`` (bool) and else as the next
    class: its top-1 predictions (int32) to ``predictions``, and to ``rows`` its row: ``keys`` (model,
    dataset, layer, layer_index, relative_depth, perturbation, level, draw), top-1 the fraction
    correct, top-5 1, ``num_classes`` ``classes``, no error, a linear level axis, ``n_images`` the
    number of labels, 0.1 s, ``outcome`` its index in ``rows``."""
    predictions.append(np.where(correct, labels, (labels + 1) % classes).astype(np.int32))
    rows.append(
        dict(
            **keys,
            top1=correct.mean(),
            top5=1.0,
            num_classes=classes,
            error="",
            level_axis="linear",
            level_unit=level_unit,
            n_images=len(labels),
            seconds=0.1,
            images_per_s=images_per_s,
            device="cpu",
            outcome=len(rows),
        )
    )


def with_outcomes(
    rows: list[dict], predictions: Sequence[np.ndarray], labels: np.ndarray, dataset: str
) -> tuple[pd.DataFrame, Outcomes]:
    """The frame of ``rows`` (row i's ``outcome`` is i) and its Outcomes: row i's top-1 predictions
    ``predictions[i]`` (int32, one per image) on the ``test`` split of ``dataset``, images 0..n-1
    with ``labels``."""
    df = pd.DataFrame(rows)
    keys = df[["model", "dataset", "layer", "perturbation", "level", "draw"]]
    subset = Subset(dataset, "test", np.arange(len(labels)), labels)
    top1 = np.stack(predictions)
    return df, Outcomes.from_runs([(keys, top1, top1 == labels, subset)])
