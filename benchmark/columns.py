"""The names every result file shares: its columns, file names, a cell's key and the evaluation subset.

Kept apart from the modules that read and write run directories (:mod:`lesionbench.store`,
:mod:`lesionbench.outcomes`, :mod:`lesionbench.results_io`) so that each can import them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

COLUMNS = [
    "model",
    "dataset",
    "layer",
    "layer_index",
    "relative_depth",
    "perturbation",
    "level",
    "draw",
    "seed",
    "top1",
    "top5",
    "loss",
    "n_images",
    "seconds",
    "images_per_s",
    "device",
    "num_classes",
    "error",
    "nonfinite_weights",
    "level_axis",
    "level_unit",
    "nonfinite_outputs",
    "flip_rate",
    "chance_top1",
    "chance_top5",
]
# Columns older result files may lack, with what they meant then (flip_rate: not measured).
OPTIONAL = {
    "error": "",
    "nonfinite_weights": float("nan"),
    "level_axis": "linear",
    "level_unit": "",
    "nonfinite_outputs": float("nan"),
    "flip_rate": float("nan"),
    # the clean row's chance accuracy where it is not k/classes (text: the unigram predictor's)
    "chance_top1": float("nan"),
    "chance_top5": float("nan"),
}
TEXT = ["model", "dataset", "layer", "perturbation", "device", "error", "level_axis", "level_unit"]
NUMERIC = [c for c in COLUMNS if c not in TEXT]  # every other column is a number (in COLUMNS' order)
CLEAN = "clean"  # the perturbation name of the one unperturbed evaluation per model
NONFINITE = "non-finite logits"  # the error of a cell whose damaged network emitted NaN/Inf
RESULTS = "results.csv"
OUTCOMES = "outcomes.arrow"
MANIFEST = "manifest.json"
LOCK = ".lock"
OUTCOME = "outcome"  # the row key carrying a cell's per-image outcomes: (top1 int32 [n], top5 bool [n])


def holds_run(path) -> bool:
    """Whether directory ``path`` holds a run (a manifest and a results file). No torch: the
    command line asks this while an interrupt may have cut torch's own import short."""
    from pathlib import Path

    return (Path(path) / MANIFEST).is_file() and (Path(path) / RESULTS).is_file()


CellKey = tuple[str, str, str, float, int]
KEY_COLUMNS = ["model", "layer", "perturbation", "level", "draw"]


def cell_key(model: str, layer: str, perturbation: str, level: float, draw: int) -> CellKey:
    return (model, layer, perturbation, float(level), int(draw))


@dataclass(frozen=True)
class Subset:
    """A run's evaluation subset: for each position, the image's index in the dataset and its label."""

    dataset: str
    split: str
    indices: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]
    # Text: each item is a window of this many next-token predictions and its outcomes are hit counts
    # (top1, top5: int32 0…tokens); None: images, outcomes are a class and a bool.
    tokens: int | None = None

    def to_json(self) -> str:
        extra = {"tokens": self.tokens} if self.tokens else {}
        return json.dumps(
            {
                "dataset": self.dataset,
                "split": self.split,
                "indices": self.indices.tolist(),
                "labels": self.labels.tolist(),
            }
            | extra
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Subset:
        d = json.loads(text)
        return cls(
            d["dataset"],
            d["split"],
            np.asarray(d["indices"], np.int64),
            np.asarray(d["labels"], np.int64),
            d.get("tokens"),
        )
