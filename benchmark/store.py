"""The run directory: a manifest, and results appended one whole row at a time.

Each row is written with a single ``write`` of a complete line, flushed and fsynced, so a crash
loses at most the cell in flight; a torn last line is cut off when the run is resumed.
``results.csv`` is the only source of truth; scores, plots and leaderboards are derived from it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch
from filelock import FileLock, Timeout

import lesionbench
from lesionbench.errors import LesionbenchError

COLUMNS = [
    "model", "dataset", "layer", "layer_index", "relative_depth", "perturbation", "level", "draw",
    "seed", "top1", "top5", "loss", "n_images", "seconds", "images_per_s", "device", "num_classes", "error",
    "nonfinite_weights", "level_axis", "level_unit", "nonfinite_outputs",
]  # fmt: skip
# Columns older result files may lack, with what they meant then.
OPTIONAL = {"error": "", "nonfinite_weights": float("nan"), "level_axis": "linear", "level_unit": "",
            "nonfinite_outputs": float("nan")}  # fmt: skip
NUMERIC = ["layer_index", "relative_depth", "level", "draw", "seed", "top1", "top5", "loss", "n_images",
           "seconds", "images_per_s", "num_classes", "nonfinite_weights", "nonfinite_outputs"]  # fmt: skip
CLEAN = "clean"
NONFINITE = "non-finite logits"  # the error of a cell whose damaged network emitted NaN/Inf  # the perturbation name of the one unperturbed evaluation per model
RESULTS = "results.csv"
MANIFEST = "manifest.json"
LOCK = ".lock"

CellKey = tuple[str, str, str, float, int]


def cell_key(model: str, layer: str, perturbation: str, level: float, draw: int) -> CellKey:
    return (model, layer, perturbation, float(level), int(draw))


class Store(Protocol):
    """Where an executor puts rows: a run directory on disk, or a table in memory (the Python API)."""

    def append(self, row: dict) -> None: ...

    def completed(self) -> set[CellKey]: ...

    def note(self, text: str) -> None: ...

    def frame(self) -> pd.DataFrame: ...


@dataclass
class MemoryStore:
    """Rows kept in memory: ``lesionbench.run(study)`` with no output directory."""

    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def append(self, row: dict) -> None:
        self.rows.append({c: row.get(c) for c in COLUMNS})

    def completed(self) -> set[CellKey]:
        return {cell_key(r["model"], r["layer"], r["perturbation"], r["level"], r["draw"]) for r in self.rows}

    def note(self, text: str) -> None:
        self.notes.append(text)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=COLUMNS)
        df["error"] = df["error"].fillna("")
        # floats as read_results gives them; seeds stay 64-bit integers (a float64 cannot hold them)
        return df.astype({c: float for c in NUMERIC if c != "seed"} | {"seed": "int64"})


@dataclass
class RunDir:
    """A run directory: manifest.json, results.csv, run.log, held under a lock while a run writes.

    The lock (``.lock``, through :mod:`filelock`) is taken by :meth:`create` and
    :meth:`open_existing` and kept until :meth:`close`: a second process writing to the same
    directory (a job resubmitted while the first still runs) is refused instead of interleaving rows.
    """

    path: Path
    _lock: FileLock | None = field(default=None, repr=False)
    already_complete: bool = False  # set by the executor when a resumed run had nothing left to do

    @staticmethod
    def exists(path: Path) -> bool:
        """Whether ``path`` holds a run (a manifest and a results file)."""
        return (Path(path) / MANIFEST).is_file() and (Path(path) / RESULTS).is_file()

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def _acquire(self) -> None:
        lock = FileLock(str(self.path / LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise LesionbenchError(
                f"another lesionbench run is writing to {str(self.path)!r} (it holds {LOCK}); wait for it to finish"
            ) from None
        self._lock = lock

    def close(self) -> None:
        """Release the lock (the directory stays as it is)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def create(cls, path: Path, study: dict, fingerprint: str, plugins: dict | None = None) -> RunDir:
        """A fresh run directory, locked; refuses one that already holds results.

        ``study`` is the study as a mapping, ``fingerprint`` the plan's, ``plugins`` each loaded
        plugin's distribution and version: all go into the manifest.
        """
        run = cls(Path(path))
        if run.path.exists() and not run.path.is_dir():
            raise LesionbenchError(f"{str(run.path)!r} exists and is not a directory")
        if run.results_path.exists():
            raise LesionbenchError(
                f"{str(run.path)!r} already holds results; resume with --resume {run.path} or choose another --out"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        run._acquire()
        manifest = {
            "study": study,
            "fingerprint": fingerprint,
            "lesionbench": lesionbench.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "plugins": plugins or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            _write_atomic(run.manifest_path, json.dumps(manifest, indent=2) + "\n")
            _write_atomic(run.results_path, ",".join(COLUMNS) + "\n")
        except OSError as exc:
            run.close()
            raise LesionbenchError(f"cannot write the run directory {str(run.path)!r}: {exc.strerror or exc}") from None
        return run

    @classmethod
    def open_existing(cls, path: Path, fingerprint: str | None = None) -> RunDir:
        """An earlier run to resume, locked; refuses one made by a different study."""
        run = cls(Path(path))
        if not run.manifest_path.is_file() or not run.results_path.is_file():
            raise LesionbenchError(f"{str(run.path)!r} is not a lesionbench run directory (no {MANIFEST})")
        manifest = run.manifest()
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
        run._repair_tail()
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
        try:
            manifest = json.loads(self.manifest_path.read_text())
            manifest["study"], manifest["fingerprint"]
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise LesionbenchError(f"{str(self.manifest_path)!r} is unreadable or damaged ({exc})") from None
        return manifest

    def _repair_tail(self) -> None:
        """Cut a torn last line left by a crash mid-write."""
        with open(self.results_path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def columns(self) -> list[str]:
        """The header of this run's results file: rows appended on resume keep its layout."""
        with open(self.results_path, encoding="utf-8") as f:
            return next(csv.reader([f.readline()]))

    def append(self, row: dict) -> None:
        """Write one complete row and make it durable before returning.

        A write that fails (disk full, file size limit) is undone, so the file keeps only whole
        rows, and reported as one line saying how to finish the run.
        """
        if not hasattr(self, "_columns"):
            self._columns = self.columns()
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in self._columns])
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

    def completed(self) -> set[CellKey]:
        df = self.frame()
        return {
            cell_key(r.model, r.layer, r.perturbation, r.level, r.draw)
            for r in df[["model", "layer", "perturbation", "level", "draw"]].itertuples(index=False)
        }


def _cell(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_results(paths: Path | str | Iterable[Path | str]) -> pd.DataFrame:
    """One results table from one or more ``results.csv`` files (or run directories)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / RESULTS
        if not p.is_file():
            raise LesionbenchError(f"results file {str(p)!r} does not exist")
        try:
            df = pd.read_csv(
                p,
                keep_default_na=False,  # a layer may be called "NA"; only numeric columns have NaN
                na_values={c: ["", "nan", "NaN"] for c in NUMERIC},
                dtype={"model": str, "dataset": str, "layer": str, "perturbation": str, "device": str, "error": str,
                       "level_axis": str, "level_unit": str},  # fmt: skip
            )
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise LesionbenchError(f"results file {str(p)!r} is not a readable CSV: {exc}") from None
        missing = [c for c in COLUMNS if c not in df.columns and c not in OPTIONAL]
        if missing:
            raise LesionbenchError(f"results file {str(p)!r} lacks columns: {', '.join(missing)}")
        for column, default in OPTIONAL.items():
            if column not in df.columns:
                df[column] = default
        df["layer"] = df["layer"].fillna("")
        df["error"] = df["error"].fillna("")
        df["level_axis"] = df["level_axis"].replace("", "linear").fillna("linear")
        df["level_unit"] = df["level_unit"].fillna("")
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
