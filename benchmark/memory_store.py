"""Where an executor puts rows: the :class:`Store` protocol, and :class:`MemoryStore`, the rows kept in memory
(``lesionbench.run(study)`` with no output directory). The run directory on disk is
:class:`lesionbench.store.RunDir`; ``lesionbench.store`` re-exports both names here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from lesionbench.columns import COLUMNS, KEY_COLUMNS, NUMERIC, OUTCOME, CellKey, Subset, cell_key
from lesionbench.outcomes import Outcomes
from lesionbench.results_io import _num


class Store(Protocol):
    """Where an executor puts rows: a run directory on disk, or a table in memory (the Python API).

    A row may carry its cell's per-image outcomes under the key :data:`OUTCOME`."""

    def append(self, row: dict) -> None: ...

    def completed(self) -> dict[CellKey, tuple[float, float]]: ...

    def note(self, text: str) -> None: ...

    def frame(self) -> pd.DataFrame: ...


@dataclass
class MemoryStore:
    """Rows (and their per-image outcomes) kept in memory: ``lesionbench.run(study)`` with no output directory."""

    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    subset: Subset | None = None
    _outcomes: list = field(default_factory=list, repr=False)  # per row: (top1, top5) or None

    def append(self, row: dict) -> None:
        self.rows.append({c: row.get(c) for c in COLUMNS})
        self._outcomes.append(row.get(OUTCOME))

    def completed(self) -> dict[CellKey, tuple[float, float]]:
        """Each cell written so far, with its (top1, top5)."""
        return {
            cell_key(r["model"], r["layer"], r["perturbation"], r["level"], r["draw"]): (
                _num(r["top1"]),
                _num(r["top5"]),
            )
            for r in self.rows
        }

    def note(self, text: str) -> None:
        self.notes.append(text)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=COLUMNS)
        df["error"] = df["error"].fillna("")
        # floats as read_results gives them; seeds stay 64-bit integers (a float64 cannot hold them)
        return df.astype({c: float for c in NUMERIC if c != "seed"} | {"seed": "int64"})

    def outcomes(self) -> tuple[pd.DataFrame, Outcomes]:
        """The results table with an ``outcome`` column, and the outcomes it points into (see
        :func:`read_results_with_outcomes`)."""
        df = self.frame()
        keep = [i for i, o in enumerate(self._outcomes) if o is not None]
        if self.subset is None or not keep:
            df["outcome"] = -1
            return df, Outcomes.empty()
        keys = df.loc[keep, ["model", "dataset"] + KEY_COLUMNS[1:]].reset_index(drop=True)
        top1 = np.stack([self._outcomes[i][0] for i in keep]).astype(np.int32)
        top5 = np.stack([self._outcomes[i][1] for i in keep]).astype(np.int32 if self.subset.tokens else bool)
        position = np.full(len(df), -1, np.int64)
        position[keep] = np.arange(len(keep))
        df["outcome"] = position
        return df, Outcomes.from_runs([(keys, top1, top5, self.subset)])
