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

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout

import lesionbench
from lesionbench.errors import LesionbenchError

COLUMNS = [
    "model", "dataset", "layer", "layer_index", "relative_depth", "perturbation", "level", "draw",
    "seed", "top1", "top5", "loss", "n_images", "seconds", "images_per_s", "device", "num_classes", "error",
    "nonfinite_weights", "level_axis", "level_unit", "nonfinite_outputs", "flip_rate", "chance_top1", "chance_top5",
]  # fmt: skip
# Columns older result files may lack, with what they meant then (flip_rate: not measured).
OPTIONAL = {"error": "", "nonfinite_weights": float("nan"), "level_axis": "linear", "level_unit": "",
            "nonfinite_outputs": float("nan"), "flip_rate": float("nan"),
            # the clean row's chance accuracy where it is not k/classes (text: the unigram predictor's)
            "chance_top1": float("nan"), "chance_top5": float("nan")}  # fmt: skip
NUMERIC = ["layer_index", "relative_depth", "level", "draw", "seed", "top1", "top5", "loss", "n_images",
           "seconds", "images_per_s", "num_classes", "nonfinite_weights", "nonfinite_outputs", "flip_rate",
           "chance_top1", "chance_top5"]  # fmt: skip
CLEAN = "clean"
NONFINITE = "non-finite logits"  # the error of a cell whose damaged network emitted NaN/Inf  # the perturbation name of the one unperturbed evaluation per model
RESULTS = "results.csv"
OUTCOMES = "outcomes.arrow"
MANIFEST = "manifest.json"
LOCK = ".lock"
OUTCOME = "outcome"  # the row key carrying a cell's per-image outcomes: (top1 int32 [n], top5 bool [n])

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
        return json.dumps({"dataset": self.dataset, "split": self.split, "indices": self.indices.tolist(),
                           "labels": self.labels.tolist()} | extra)  # fmt: skip

    @classmethod
    def from_json(cls, text: str | bytes) -> Subset:
        d = json.loads(text)
        return cls(d["dataset"], d["split"], np.asarray(d["indices"], np.int64), np.asarray(d["labels"], np.int64),
                   d.get("tokens"))  # fmt: skip


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
        return {cell_key(r["model"], r["layer"], r["perturbation"], r["level"], r["draw"]): (_num(r["top1"]), _num(r["top5"]))
                for r in self.rows}  # fmt: skip

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


@dataclass
class Outcomes:
    """Per-image outcomes of many cells, one column per image.

    ``keys``: one row per cell (model, dataset, layer, perturbation, level, draw); ``top1``: int32
    [cells, images], the predicted class, -1 where the cell did not evaluate that image; ``top5``:
    bool [cells, images], the label was among the five highest scores; ``images``: one row per
    column (dataset, split, index in the dataset, label, tokens). A text window's column (``tokens``
    T > 1) holds counts instead: ``top1`` its top-1 hits (0…T, -1 not evaluated), ``top5`` its
    top-5 hits, and ``top5`` is then int32. Cells of runs on different subsets share
    the column of an image both evaluated (same dataset, split and index), so that statistics
    computed over images pair what was measured on the same images and only that.
    """

    keys: pd.DataFrame
    top1: np.ndarray
    top5: np.ndarray
    images: pd.DataFrame

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls) -> Outcomes:
        return cls(pd.DataFrame(columns=["model", "dataset"] + KEY_COLUMNS[1:]), np.zeros((0, 0), np.int32),
                   np.zeros((0, 0), bool), pd.DataFrame(columns=["dataset", "split", "index", "label", "tokens"]))  # fmt: skip

    @classmethod
    def from_runs(cls, parts: list[tuple[pd.DataFrame, np.ndarray, np.ndarray, Subset]]) -> Outcomes:
        """Stack the cells of several runs, each ``(keys, top1 [cells, n], top5 [cells, n], subset)``
        with columns in its subset's order, onto the union of their images."""
        if not parts:
            return cls.empty()
        frames = [pd.DataFrame({"dataset": s.dataset, "split": s.split, "index": s.indices, "label": s.labels,
                                "tokens": s.tokens or 1}) for _k, _t1, _t5, s in parts]  # fmt: skip
        images = pd.concat(frames, ignore_index=True).drop_duplicates(["dataset", "split", "index"], ignore_index=True)
        column = {k: i for i, k in enumerate(zip(images["dataset"], images["split"], images["index"]))}
        n_cells = sum(len(k) for k, *_ in parts)
        top1 = np.full((n_cells, len(images)), -1, np.int32)
        top5 = np.zeros((n_cells, len(images)), np.int32 if any(s.tokens for *_r, s in parts) else bool)
        row = 0
        for keys, t1, t5, s in parts:
            cols = np.array([column[(s.dataset, s.split, int(i))] for i in s.indices], dtype=np.int64)
            top1[row : row + len(keys), cols] = t1
            top5[row : row + len(keys), cols] = t5
            row += len(keys)
        keys = pd.concat([k for k, *_ in parts], ignore_index=True)
        return cls(keys, top1, top5, images)

    @classmethod
    def concat(cls, *many: Outcomes) -> Outcomes:
        """The cells of several Outcomes, one after the other (row offsets add up), on the union of
        their images."""
        parts, offset = [], 0
        for o in many:
            for (dataset, split), cols in o.images.groupby(["dataset", "split"], sort=False).indices.items():
                mine = (o.keys["dataset"] == dataset).to_numpy() & (o.top1[:, cols] >= 0).any(axis=1)
                rows = np.flatnonzero(mine)
                if rows.size:
                    img = o.images.iloc[cols]
                    tokens = int(img["tokens"].max()) if "tokens" in img.columns else 1
                    subset = Subset(dataset, split, img["index"].to_numpy(np.int64), img["label"].to_numpy(np.int64),
                                    tokens if tokens > 1 else None)  # fmt: skip
                    parts.append((rows + offset, o.keys.iloc[rows], o.top1[np.ix_(rows, cols)], o.top5[np.ix_(rows, cols)],
                                  subset))  # fmt: skip
            offset += len(o)
        keys = pd.concat([o.keys for o in many], ignore_index=True) if many else cls.empty().keys
        if not parts:
            return cls(keys, np.full((offset, 0), -1, np.int32), np.zeros((offset, 0), bool), cls.empty().images)
        stacked = cls.from_runs([p[1:] for p in parts])
        where = np.concatenate([p[0] for p in parts])  # the row each stacked cell belongs to
        top1 = np.full((offset, stacked.top1.shape[1]), -1, np.int32)
        top5 = np.zeros((offset, stacked.top1.shape[1]), stacked.top5.dtype)
        top1[where], top5[where] = stacked.top1, stacked.top5
        return cls(keys, top1, top5, stacked.images)


def _outcome_schema(subset: Subset):
    import pyarrow as pa

    fields = [("model", pa.string()), ("layer", pa.string()), ("perturbation", pa.string()), ("level", pa.float64()),
              ("draw", pa.int64()), ("top1", pa.list_(pa.int32())),
              ("top5", pa.list_(pa.int32() if subset.tokens else pa.bool_()))]  # fmt: skip
    return pa.schema(fields, metadata={"lesionbench.subset": subset.to_json()})


class _OutcomeWriter:
    """Appends record batches to an Arrow IPC stream file, each as one fsynced write.

    The stream's schema is written once, when the file is created; a later process (``--resume``)
    primes a writer of its own with an empty batch and appends only the batches that follow.
    """

    def __init__(self, path: Path, subset: Subset) -> None:
        import pyarrow as pa

        self.pa, self.path = pa, path
        self.schema = _outcome_schema(subset)
        self.sink = io.BytesIO()
        self.writer = pa.ipc.new_stream(self.sink, self.schema, options=pa.ipc.IpcWriteOptions(compression="lz4"))
        self.writer.write_batch(pa.record_batch([pa.array([], f.type) for f in self.schema], schema=self.schema))
        prime = self._take()
        fresh = not path.is_file() or path.stat().st_size == 0
        self.file = open(path, "ab", buffering=0)  # kept open, unbuffered: one write and one fsync per cell
        if fresh:
            self._write(prime)

    def _take(self) -> bytes:
        data = self.sink.getvalue()
        self.sink.seek(0)
        self.sink.truncate()
        return data

    def _write(self, data: bytes) -> None:
        """Append ``data`` whole and durably, or not at all (a failed write is cut back off)."""
        fd = self.file.fileno()
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += self.file.write(memoryview(data)[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # no torn batch left behind (truncating frees space: it cannot fail the same way)
            raise

    def close(self) -> None:
        self.file.close()

    def append(self, row: dict, top1: np.ndarray, top5: np.ndarray) -> None:
        pa = self.pa
        values = [[row["model"]], [row["layer"]], [row["perturbation"]], [float(row["level"])], [int(row["draw"])]]
        arrays = [pa.array(v, f.type) for v, f in zip(values, self.schema)]
        for flat, f in ((np.asarray(top1, np.int32), self.schema.field("top1")), (np.asarray(top5, self.schema.field("top5").type.value_type.to_pandas_dtype()), self.schema.field("top5"))):
            arrays.append(pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), pa.array(flat), type=f.type))
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self._write(self._take())


def _valid_stream_bytes(path: Path) -> int:
    """How many leading bytes of an Arrow IPC stream file are whole messages (a crash may tear the last)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        good = 0
        while True:
            try:
                message = pa.ipc.read_message(src)
            except (OSError, pa.ArrowInvalid, EOFError, IndexError):
                break
            if message is None:
                break
            good = src.tell()
        return good


def read_outcome_file(path: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, Subset] | None:
    """One run's ``outcomes.arrow``: (keys, top1 [cells, n], top5 [cells, n], subset); the last
    batch of a cell written twice (a crash between outcomes and row) wins; a torn tail is ignored.
    None when the file holds no schema."""
    import pyarrow as pa

    good = _valid_stream_bytes(path)
    if good == 0:
        return None
    with open(path, "rb") as f:
        data = f.read(good)
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        table = reader.read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise LesionbenchError(f"per-image outcomes {str(path)!r} are unreadable ({exc})") from None
    meta = reader.schema.metadata or {}
    if b"lesionbench.subset" not in meta:
        raise LesionbenchError(f"{str(path)!r} is not a lesionbench outcomes file (no subset in its schema)")
    subset = Subset.from_json(meta[b"lesionbench.subset"])
    keys = pd.DataFrame({c: table.column(c).to_numpy(zero_copy_only=False) for c in KEY_COLUMNS})
    keys.insert(1, "dataset", subset.dataset)
    n, cells = len(subset.indices), table.num_rows
    top1 = table.column("top1").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(cells, n) if cells else np.zeros((0, n), np.int32)
    top5 = table.column("top5").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(cells, n) if cells else np.zeros((0, n), bool)
    last = ~keys.duplicated(KEY_COLUMNS, keep="last").to_numpy()
    return keys[last].reset_index(drop=True), top1[last], top5[last].astype(np.int32 if subset.tokens else bool), subset


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

    @staticmethod
    def exists(path: Path) -> bool:
        """Whether ``path`` holds a run (a manifest and a results file)."""
        return (Path(path) / MANIFEST).is_file() and (Path(path) / RESULTS).is_file()

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
        lock = FileLock(str(self.path / LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise LesionbenchError(
                f"another lesionbench run is writing to {str(self.path)!r} (it holds {LOCK}); wait for it to finish"
            ) from None
        self._lock = lock

    def close(self) -> None:
        """Close the outcomes file and release the lock (the directory stays as it is)."""
        if self._outcomes is not None:
            self._outcomes.close()
            self._outcomes = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def create(cls, path: Path, study: dict, fingerprint: str, plugins: dict | None = None,
               subset: Subset | None = None) -> RunDir:  # fmt: skip
        """A fresh run directory, locked; refuses one that already holds results.

        ``study`` is the study as a mapping, ``fingerprint`` the plan's, ``plugins`` each loaded
        plugin's distribution and version: all go into the manifest. With ``subset`` (the
        evaluation subset) rows' per-image outcomes go to ``outcomes.arrow``.
        """
        run = cls(Path(path), subset=subset)
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
            run.outcomes_path.unlink(missing_ok=True)  # left by a run that crashed before its first row
            if subset is not None:
                run._outcomes = _OutcomeWriter(run.outcomes_path, subset)
        except OSError as exc:
            run.close()
            raise LesionbenchError(f"cannot write the run directory {str(run.path)!r}: {exc.strerror or exc}") from None
        return run

    @classmethod
    def open_existing(cls, path: Path, fingerprint: str | None = None, subset: Subset | None = None) -> RunDir:
        """An earlier run to resume, locked; refuses one made by a different study. With ``subset``,
        outcomes of the cells still to run are kept (in a new outcomes file for a run made before them)."""
        run = cls(Path(path), subset=subset)
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
        """Cut a torn last line left by a crash mid-write, and a torn last outcome batch."""
        with open(self.results_path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
        if self.outcomes_path.is_file():
            good = _valid_stream_bytes(self.outcomes_path)
            if good < self.outcomes_path.stat().st_size:
                with open(self.outcomes_path, "rb+") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())

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


def _num(value) -> float:
    return float("nan") if value is None else float(value)


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


def read_results_with_outcomes(paths: Path | str | Iterable[Path | str]) -> tuple[pd.DataFrame, Outcomes]:
    """:func:`read_results`, plus each run's per-image outcomes (``outcomes.arrow`` beside its
    ``results.csv``, where there is one).

    Returns the table with an extra int64 column ``outcome`` — the row of the returned
    :class:`Outcomes` holding that row's per-image outcomes, -1 where it has none (a run made
    before outcomes were kept, a failed cell) — and the outcomes.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames, parts, offset = [], [], 0
    for p in map(Path, paths):
        df = read_results(p)
        results = p / RESULTS if p.is_dir() else p
        found = read_outcome_file(results.parent / OUTCOMES) if (results.parent / OUTCOMES).is_file() else None
        df["outcome"] = -1
        if found is not None:
            keys, top1, top5, subset = found
            local = keys[KEY_COLUMNS].assign(_row=np.arange(len(keys)))
            matched = df[KEY_COLUMNS].reset_index().merge(local, on=KEY_COLUMNS, how="inner")
            used = np.unique(matched["_row"].to_numpy())
            renumber = np.full(len(keys), -1, np.int64)
            renumber[used] = offset + np.arange(len(used))
            df.loc[matched["index"].to_numpy(), "outcome"] = renumber[matched["_row"].to_numpy()]
            keys = keys.iloc[used].reset_index(drop=True)
            parts.append((keys, top1[used], top5[used], subset))
            offset += len(used)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df["outcome"] = df["outcome"].astype(np.int64)
    return df, Outcomes.from_runs(parts)
