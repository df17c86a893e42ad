"""The run directory: a manifest, results appended one whole row at a time, per-image outcomes.

Each row is written with a single ``write`` of a complete line, flushed and fsynced, so a crash
loses at most the cell in flight; a torn last line is cut off when the run is resumed.
``results.csv`` is the source of truth for every cell's numbers; scores, plots and leaderboards
are derived from it.

Beside it, ``outcomes.arrow`` keeps each cell's per-image outcomes: an Arrow IPC stream (open it
with ``pyarrow.ipc.open_stream``) with one record batch per cell — its key (model, layer,
perturbation, level, draw), ``top1`` (list<int32>: the predicted class of each image of the
evaluation subset, by position in the subset; -1 for an image the model could not read) and
``top5`` (list<bool>: the label was among the five highest scores). The schema's metadata
``lesionbench.subset`` (JSON) gives the subset: dataset, split, each position's index in the
dataset and its label. A cell's batch is written and fsynced *before* its row, so every row
written has its outcomes; on resume a torn batch is cut off, and a batch whose row never came
(the cell in flight at a crash) is ignored when reading and written again when the cell is.

Here: :class:`RunDir`, the run directory's lifecycle (create, reopen, lock, append, read back). Its files
rewritten in place on resume and redo are :mod:`lesionbench.run_rewrite`; the rows kept in memory,
:class:`~lesionbench.memory_store.MemoryStore`, and the :class:`~lesionbench.memory_store.Store` protocol
are re-exported from :mod:`lesionbench.memory_store`, the readers from :mod:`lesionbench.results_io`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock

import lesionbench
from lesionbench import run_rewrite, runlock
from lesionbench.columns import (
    CLEAN,
    COLUMNS,
    KEY_COLUMNS,
    LOCK,
    MANIFEST,
    NONFINITE,
    NUMERIC,
    OPTIONAL,
    OUTCOME,
    OUTCOMES,
    RESULTS,
    CellKey,
    Subset,
    cell_key,
    holds_run,
)
from lesionbench.errors import LesionbenchError
from lesionbench.memory_store import MemoryStore, Store
from lesionbench.outcomes import Outcomes, _outcome_schema, _OutcomeWriter, _valid_stream_bytes, read_outcome_file
from lesionbench.results_io import _cell, _num, _write_atomic, read_results, read_results_with_outcomes
from lesionbench.schema import BINDING, RESULTS_SCHEMA, read_manifest, row_checksum, schema_version


@dataclass
class RunDir:
    """A run directory: manifest.json, results.csv, outcomes.arrow, run.log, held under a lock while a run writes.

    The lock (``.lock``, through :mod:`filelock`) is taken by :meth:`create` and
    :meth:`open_existing` and kept until :meth:`close`: a second process writing to the same
    directory (a job resubmitted while the first still runs) is refused instead of interleaving rows.
    """

    path: Path
    _lock: FileLock | None = field(default=None, repr=False)
    subset: Subset | None = None  # the evaluation subset, for the outcomes file
    _outcomes: _OutcomeWriter | None = field(default=None, repr=False)
    already_complete: bool = False  # set by the executor when a resumed run had nothing left to do
    fingerprint: str = ""  # the plan's, from the manifest: every row written carries it

    @staticmethod
    def exists(path: Path) -> bool:
        """Whether ``path`` holds a run (a manifest and a results file)."""
        return holds_run(path)

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def outcomes_path(self) -> Path:
        return self.path / OUTCOMES

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def _acquire(self) -> None:
        self._lock = runlock.acquire(self.path)

    def close(self) -> None:
        """Close the outcomes file and release the lock, removing ``.lock`` (the rest stays as it is)."""
        if self._outcomes is not None:
            self._outcomes.close()
            self._outcomes = None
        if self._lock is not None:
            runlock.release(self._lock, self.path)
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def create(
        cls, path: Path, study: dict, fingerprint: str, plugins: dict | None = None, subset: Subset | None = None
    ) -> RunDir:
        """A fresh run directory, locked; refuses one that already holds results.

        ``study`` is the study as a mapping, ``fingerprint`` the plan's, ``plugins`` each loaded
        plugin's distribution and version: all go into the manifest. With ``subset`` (the
        evaluation subset) rows' per-image outcomes go to ``outcomes.arrow``.

        The directory becomes a run atomically: manifest, results header and outcomes schema are
        written into a hidden sibling ``.NAME.partial-PID`` that is then renamed to ``path`` (an
        empty directory there is replaced), so a kill at any instant leaves either no run (and at
        most a stale sibling, removed by the next attempt) or one that ``--resume`` finishes.
        """
        run = cls(Path(path), subset=subset, fingerprint=fingerprint)
        if run.path.exists() and not run.path.is_dir():
            raise LesionbenchError(f"{str(run.path)!r} exists and is not a directory")
        if run.path.is_dir() and any(run.path.iterdir()):
            if run.results_path.exists():
                raise LesionbenchError(
                    f"{str(run.path)!r} already holds results; resume with --resume {run.path} or choose another --out"
                )
            raise LesionbenchError(f"{str(run.path)!r} is not empty and holds no run; choose another --out")
        manifest = {
            "study": study,
            "fingerprint": fingerprint,
            "results_schema": RESULTS_SCHEMA,
            "outcomes": subset is not None,  # every row without an error has its per-image outcomes
            "lesionbench": lesionbench.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "plugins": plugins or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        parent = run.path.absolute().parent
        staging = parent / f".{run.path.name}.partial-{os.getpid()}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            for stale in parent.glob(f".{glob.escape(run.path.name)}.partial-*"):  # left by a run killed while starting
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir()
            _write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            _write_atomic(staging / RESULTS, ",".join(COLUMNS + BINDING) + "\n")
            if subset is not None:
                _OutcomeWriter(staging / OUTCOMES, subset).close()
            os.replace(staging, run.path)  # the run appears whole, or not at all
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise LesionbenchError(f"cannot write the run directory {str(run.path)!r}: {exc.strerror or exc}") from None
        run._acquire()
        run.note(
            f"run started: lesionbench {lesionbench.__version__}, torch {torch.__version__}, fingerprint {fingerprint}"
        )
        return run

    @classmethod
    def open_existing(cls, path: Path, fingerprint: str | None = None, subset: Subset | None = None) -> RunDir:
        """An earlier run to resume, locked; refuses one made by a different study, and rows that
        break the results schema. With ``subset``, outcomes of the cells still to run are kept (in a
        new outcomes file for a run made before them); rows whose outcomes are unreadable are
        dropped (see :func:`lesionbench.run_rewrite.repair_outcomes`), so the resumed run evaluates those cells again."""
        run = cls(Path(path), subset=subset)
        if not run.manifest_path.is_file() or not run.results_path.is_file():
            raise LesionbenchError(f"{str(run.path)!r} is not a lesionbench run directory (no {MANIFEST})")
        manifest = run.manifest()
        run.fingerprint = manifest["fingerprint"]
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise LesionbenchError(
                f"{str(run.path)!r} was made by a different study (fingerprint "
                f"{manifest['fingerprint']} ≠ {fingerprint}); refusing to mix results"
            )
        if manifest.get("torch", torch.__version__) != torch.__version__:
            raise LesionbenchError(
                f"{str(run.path)!r} was started with torch {manifest['torch']} but this is torch "
                f"{torch.__version__}; its random draws may differ, so the run cannot be resumed here"
            )
        run._acquire()
        try:
            run_rewrite.repair_tail(run)
            run.frame()  # the rows must be this run's, whole and well-formed, before any is trusted
            if subset is not None and run.outcomes_path.is_file():
                run_rewrite.repair_outcomes(run, schema_version(manifest) if manifest.get("outcomes") else 1)
        except BaseException:
            run.close()
            raise
        return run

    def note(self, text: str) -> None:
        """A line in the run's log (engine fallbacks and the like); best effort: a full disk is
        reported by the next row's write, not by the log."""
        try:
            with open(self.path / "run.log", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
        except OSError:
            pass

    def manifest(self) -> dict:
        """The run's manifest, checked (:func:`lesionbench.schema.read_manifest`)."""
        manifest = read_manifest(self.manifest_path)
        if manifest is None or "fingerprint" not in manifest:
            raise LesionbenchError(f"{str(self.manifest_path)!r} is unreadable or damaged (no fingerprint)")
        return manifest

    def forget(self, perturbations: list[str]) -> int:
        """Drop every cell of ``perturbations`` (rows and outcome batches; a name also covers its
        BatchNorm-recalibrated rows) so that ``--resume`` evaluates them again, and record it in the
        manifest: ``run --resume DIR --redo``. Returns the number of rows dropped; raises
        LesionbenchError when none is of ``perturbations``. See :func:`lesionbench.run_rewrite.forget`."""
        return run_rewrite.forget(self, perturbations)

    def columns(self) -> list[str]:
        """The header of this run's results file: rows appended on resume keep its layout."""
        with open(self.results_path, encoding="utf-8") as f:
            return next(csv.reader([f.readline()]))

    def append(self, row: dict) -> None:
        """Write one complete row and make it durable before returning; its per-image outcomes
        (under :data:`OUTCOME`) are made durable first.

        A write that fails (disk full, file size limit) is undone, so the file keeps only whole
        rows, and reported as one line saying how to finish the run (a torn outcome batch is cut
        by ``--resume``).
        """
        if row.get(OUTCOME) is not None and self.subset is not None:
            try:
                if self._outcomes is None:
                    self._outcomes = _OutcomeWriter(self.outcomes_path, self.subset)
                self._outcomes.append(row, *row[OUTCOME])
            except OSError as exc:
                raise LesionbenchError(
                    f"cannot write {str(self.outcomes_path)!r} ({exc.strerror or exc}); the rows written so far are "
                    f"whole: free space and finish with lesionbench run --resume {self.path}"
                ) from None
        if not hasattr(self, "_columns"):
            self._columns = self.columns()
        buf = io.StringIO()
        cells = [_cell(row.get(c)) for c in self._columns]
        if self._columns[-len(BINDING) :] == BINDING:  # schema 2: bound to the run by its fingerprint and a checksum
            cells[-2:] = [self.fingerprint, row_checksum(self.fingerprint, cells[: -len(BINDING)])]
        csv.writer(buf, lineterminator="\n").writerow(cells)
        data = buf.getvalue().encode("utf-8")
        fd = os.open(self.results_path, os.O_WRONLY | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, size)  # never a torn row (truncating frees space: it cannot fail the same way)
                raise LesionbenchError(
                    f"cannot write {str(self.results_path)!r} ({exc.strerror or exc}); the rows written so far are "
                    f"whole: free space and finish with lesionbench run --resume {self.path}"
                ) from None
        finally:
            os.close(fd)

    def frame(self) -> pd.DataFrame:
        return read_results(self.results_path)

    def outcomes(self) -> tuple[pd.DataFrame, Outcomes]:
        """The results with an ``outcome`` column, and the outcomes it points into."""
        return read_results_with_outcomes([self.results_path])

    def completed(self) -> dict[CellKey, tuple[float, float]]:
        """Each cell written so far, with its (top1, top5) (NaN for a failed cell): what ``--resume``
        skips, and what adaptive draws decide from."""
        df = self.frame()
        return {
            cell_key(r.model, r.layer, r.perturbation, r.level, r.draw): (float(r.top1), float(r.top5))
            for r in df[KEY_COLUMNS + ["top1", "top5"]].itertuples(index=False)
        }


__all__ = [
    "CLEAN",
    "COLUMNS",
    "KEY_COLUMNS",
    "LOCK",
    "MANIFEST",
    "NONFINITE",
    "NUMERIC",
    "OPTIONAL",
    "OUTCOME",
    "OUTCOMES",
    "RESULTS",
    "CellKey",
    "MemoryStore",
    "Outcomes",
    "RunDir",
    "Store",
    "Subset",
    "_OutcomeWriter",
    "_cell",
    "_num",
    "_outcome_schema",
    "_valid_stream_bytes",
    "_write_atomic",
    "cell_key",
    "read_outcome_file",
    "read_results",
    "read_results_with_outcomes",
]
