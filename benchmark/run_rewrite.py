"""A run directory's files rewritten in place, each atomically: what ``--resume`` repairs and ``--redo`` drops.

* :func:`repair_tail` cuts a torn last row and a torn last outcome batch (a crash mid-write);
* :func:`repair_outcomes` drops the rows whose per-image outcomes cannot be read, so they are evaluated again;
* :func:`forget` drops every cell of some perturbations, rows and outcome batches (``run --resume DIR --redo``).

Each takes the open, locked :class:`~lesionbench.store.RunDir` (``lesionbench.store`` calls them); rows
are numbered as :meth:`RunDir.frame <lesionbench.store.RunDir.frame>` numbers them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import lesionbench
from lesionbench.columns import CLEAN, KEY_COLUMNS, OUTCOMES, cell_key
from lesionbench.errors import LesionbenchError
from lesionbench.outcomes import _valid_stream_bytes, read_outcome_file
from lesionbench.results_io import _write_atomic
from lesionbench.schema import BN_SUFFIX

if TYPE_CHECKING:
    from lesionbench.store import RunDir


def repair_tail(run: RunDir) -> None:
    """Cut a torn last line left by a crash mid-write, and a torn last outcome batch."""
    with open(run.results_path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
    if run.outcomes_path.is_file():
        good = _valid_stream_bytes(run.outcomes_path)
        if good < run.outcomes_path.stat().st_size:
            with open(run.outcomes_path, "rb+") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())


def repair_outcomes(run: RunDir, version: int) -> None:
    """Rows whose per-image outcomes cannot be read (a damaged ``outcomes.arrow``: a batch cut or
    corrupted in the middle, an unreadable schema) are dropped from ``results.csv`` — rewritten
    atomically, the damaged file kept as ``outcomes.arrow.damaged`` — so ``--resume``
    evaluates those cells again (same seeds: the same numbers). Rows of a failed cell, and of
    schema-1 runs (some made before outcomes were kept) need none."""
    try:
        found = read_outcome_file(run.outcomes_path)
    except LesionbenchError:
        found = None
    df = run.frame()
    have = set() if found is None else {cell_key(*k) for k in found[0][KEY_COLUMNS].itertuples(index=False)}
    lost = [
        i
        for i, (k, error) in enumerate(zip(df[KEY_COLUMNS].itertuples(index=False), df["error"]))
        if version >= 2 and error == "" and cell_key(*k) not in have
    ]
    if found is None:
        os.replace(run.outcomes_path, run.outcomes_path.with_name(OUTCOMES + ".damaged"))
    if not lost:
        return
    run.note(f"{len(lost)} rows had unreadable per-image outcomes; their cells are evaluated again")
    drop_rows(run, lost)


def drop_rows(run: RunDir, rows: list[int]) -> None:
    """Rewrite ``results.csv`` atomically without the data rows ``rows`` (0-based, as :meth:`RunDir.frame` numbers them)."""
    with open(run.results_path, encoding="utf-8") as f:
        lines = f.readlines()
    drop = {i + 1 for i in rows}  # line 0 is the header
    _write_atomic(run.results_path, "".join(line for i, line in enumerate(lines) if i not in drop))


def forget(run: RunDir, perturbations: list[str]) -> int:
    """Drop every cell of ``perturbations`` — its row and its per-image outcome batch — so that
    ``--resume`` evaluates those cells again with this lesionbench (``run --resume DIR --redo``,
    after a perturbation's definition changed). A name also covers its BatchNorm-recalibrated
    rows (``weight_noise`` → ``weight_noise+bn_recalibrate``). Every other row, and the bytes
    of every other outcome batch, stay as they are; the manifest's ``recomputed`` list records
    what was dropped, when, and by which lesionbench and torch.

    Each file is replaced atomically, rows first: a kill in between leaves outcome batches
    without rows, which readers ignore and ``--resume`` overwrites. Returns the number of rows
    dropped; raises LesionbenchError when none is of ``perturbations``."""
    df = run.frame()
    mine = df["perturbation"].str.removesuffix(BN_SUFFIX).isin(perturbations).to_numpy()
    if not mine.any():
        found = sorted(set(df["perturbation"]) - {CLEAN})
        raise LesionbenchError(
            f"{str(run.path)!r} has no rows of {', '.join(perturbations)} to redo "
            f"(its perturbations: {', '.join(found) or 'none'})"
        )
    cells = int(mine.sum())
    run.note(
        f"redo {', '.join(perturbations)}: {cells} cells dropped, evaluated again by lesionbench "
        f"{lesionbench.__version__}, torch {torch.__version__}"
    )
    drop_rows(run, list(np.flatnonzero(mine)))
    if run.outcomes_path.is_file():
        write_bytes_atomic(run.outcomes_path, without_batches(run.outcomes_path, set(df["perturbation"][mine])))
    manifest = run.manifest()
    manifest.setdefault("recomputed", []).append(
        {
            "perturbations": list(perturbations),
            "cells": cells,
            "lesionbench": lesionbench.__version__,
            "torch": torch.__version__,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    write_bytes_atomic(run.manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return cells


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` whole and durably (a sibling written and fsynced, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def without_batches(path: Path, perturbations: set[str]) -> bytes:
    """The Arrow IPC stream in ``path`` (whole messages only) without the record batches whose cell
    is of one of ``perturbations``; every other message is kept byte for byte."""
    import pyarrow as pa

    with open(path, "rb") as f:
        data = f.read(_valid_stream_bytes(path))
    src, kept, schema, start = pa.BufferReader(pa.py_buffer(data)), [], None, 0
    while start < len(data):
        message = pa.ipc.read_message(src)
        end = src.tell()
        if schema is None:
            schema = pa.ipc.read_schema(message)
        else:
            batch = pa.ipc.read_record_batch(message, schema)
            if batch.num_rows and batch.column("perturbation")[0].as_py() in perturbations:
                start = end
                continue
        kept.append(data[start:end])
        start = end
    return b"".join(kept)
