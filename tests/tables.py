"""Results tables made by hand, for the tests of the scores and the bootstrap.

* :func:`table`: the columns the point scores read, a clean row and each layer's curve (per level,
  an accuracy per draw);
* :func:`with_outcomes`: rows that carry per-image outcomes (an ``outcome`` column) and the
  :class:`~lesionbench.store.Outcomes` holding those images' predictions.
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
