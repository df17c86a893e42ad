"""Per-image outcomes: the ``outcomes.arrow`` file of a run directory and the :class:`Outcomes` table.

``outcomes.arrow`` is an Arrow IPC stream (open it with ``pyarrow.ipc.open_stream``) with one
record batch per cell — its key (model, layer, perturbation, level, draw), ``top1``
(list<int32>: the predicted class of each image of the evaluation subset, by position in the
subset; -1 for an image the model could not read) and ``top5`` (list<bool>: the label was among
the five highest scores). The schema's metadata ``lesionbench.subset`` (JSON) gives the subset:
dataset, split, each position's index in the dataset and its label.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lesionbench.columns import KEY_COLUMNS, Subset
from lesionbench.errors import LesionbenchError
from lesionbench.names import legacy_layer_names


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
        return cls(
            pd.DataFrame(columns=["model", "dataset"] + KEY_COLUMNS[1:]),
            np.zeros((0, 0), np.int32),
            np.zeros((0, 0), bool),
            pd.DataFrame(columns=["dataset", "split", "index", "label", "tokens"]),
        )

    @classmethod
    def from_runs(cls, parts: list[tuple[pd.DataFrame, np.ndarray, np.ndarray, Subset]]) -> Outcomes:
        """Stack the cells of several runs, each ``(keys, top1 [cells, n], top5 [cells, n], subset)``
        with columns in its subset's order, onto the union of their images."""
        if not parts:
            return cls.empty()
        frames = [
            pd.DataFrame(
                {"dataset": s.dataset, "split": s.split, "index": s.indices, "label": s.labels, "tokens": s.tokens or 1}
            )
            for _k, _t1, _t5, s in parts
        ]
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
                    subset = Subset(
                        dataset,
                        split,
                        img["index"].to_numpy(np.int64),
                        img["label"].to_numpy(np.int64),
                        tokens if tokens > 1 else None,
                    )
                    parts.append(
                        (
                            rows + offset,
                            o.keys.iloc[rows],
                            o.top1[np.ix_(rows, cols)],
                            o.top5[np.ix_(rows, cols)],
                            subset,
                        )
                    )
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

    fields = [
        ("model", pa.string()),
        ("layer", pa.string()),
        ("perturbation", pa.string()),
        ("level", pa.float64()),
        ("draw", pa.int64()),
        ("top1", pa.list_(pa.int32())),
        ("top5", pa.list_(pa.int32() if subset.tokens else pa.bool_())),
    ]
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
        for flat, f in (
            (np.asarray(top1, np.int32), self.schema.field("top1")),
            (np.asarray(top5, self.schema.field("top5").type.value_type.to_pandas_dtype()), self.schema.field("top5")),
        ):
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
    keys["layer"] = legacy_layer_names(keys["model"], keys["layer"])  # as results.csv is read (lesionbench.names)
    n, cells = len(subset.indices), table.num_rows
    top1 = (
        table.column("top1").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(cells, n)
        if cells
        else np.zeros((0, n), np.int32)
    )
    top5 = (
        table.column("top5").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(cells, n)
        if cells
        else np.zeros((0, n), bool)
    )
    last = ~keys.duplicated(KEY_COLUMNS, keep="last").to_numpy()
    return keys[last].reset_index(drop=True), top1[last], top5[last].astype(np.int32 if subset.tokens else bool), subset
