"""Reading ``results.csv`` files back: every read is checked against the results schema
(:mod:`lesionbench.schema`) before a number is used, and rows are joined with their per-image outcomes."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from lesionbench.columns import COLUMNS, KEY_COLUMNS, NUMERIC, OPTIONAL, OUTCOMES, RESULTS
from lesionbench.errors import LesionbenchError
from lesionbench.names import legacy_layer_names
from lesionbench.outcomes import Outcomes, read_outcome_file
from lesionbench.schema import BINDING, SchemaViolation, check_outcomes, check_rows, manifest_beside, schema_version


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


def read_results(paths: Path | str | Iterable[Path | str], allow_empty: bool = True) -> pd.DataFrame:
    """One results table from one or more ``results.csv`` files (or run directories), each checked
    against the results schema (:func:`lesionbench.schema.check_rows`) first.

    Raises LesionbenchError (:class:`~lesionbench.schema.SchemaViolation` for a file that breaks
    the schema: one line naming file, row and field); with ``allow_empty=False`` also for a file
    that holds no rows."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / RESULTS
        df = _read_one(p)
        if not allow_empty and df.empty:
            raise SchemaViolation(
                f"results file {str(p)!r} holds no rows (a header only: the run has not finished "
                "a cell); nothing to score"
            )
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _read_one(p: Path) -> pd.DataFrame:
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise LesionbenchError(f"results file {str(p)!r} does not exist") from None
    except OSError as exc:
        raise LesionbenchError(f"results file {str(p)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        raw = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        df = pd.read_csv(
            io.BytesIO(data),
            keep_default_na=False,  # a layer may be called "NA"; only numeric columns have NaN
            na_values={c: ["", "nan", "NaN"] for c in NUMERIC},
            dtype={
                "model": str,
                "dataset": str,
                "layer": str,
                "perturbation": str,
                "device": str,
                "error": str,
                "level_axis": str,
                "level_unit": str,
                "run": str,
                "checksum": str,
            },
        )
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise SchemaViolation(f"results file {str(p)!r} is not a readable CSV: {str(exc).strip()}") from None
    missing = [c for c in COLUMNS if c not in df.columns and c not in OPTIONAL]
    if missing:
        raise SchemaViolation(f"results file {str(p)!r}, header, field {', '.join(missing)}: missing")
    check_rows(raw.fillna(""), p, manifest_beside(p), torn=bool(data) and not data.endswith(b"\n"))
    df = df.drop(columns=[c for c in BINDING if c in df.columns])
    for column, default in OPTIONAL.items():
        if column not in df.columns:
            df[column] = default
    df["layer"] = legacy_layer_names(df["model"], df["layer"].fillna(""))  # keys from before the naming rule
    df["error"] = df["error"].fillna("")
    df["level_axis"] = df["level_axis"].replace("", "linear").fillna("linear")
    df["level_unit"] = df["level_unit"].fillna("")
    return df


def read_results_with_outcomes(
    paths: Path | str | Iterable[Path | str], allow_empty: bool = True
) -> tuple[pd.DataFrame, Outcomes]:
    """:func:`read_results`, plus each run's per-image outcomes (``outcomes.arrow`` beside its
    ``results.csv``, where there is one), each row checked against its outcomes
    (:func:`lesionbench.schema.check_outcomes`).

    Returns the table with an extra int64 column ``outcome`` — the row of the returned
    :class:`Outcomes` holding that row's per-image outcomes, -1 where it has none (a run made
    before outcomes were kept, a failed cell) — and the outcomes.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames, parts, offset = [], [], 0
    for p in map(Path, paths):
        df = read_results(p, allow_empty)
        results = p / RESULTS if p.is_dir() else p
        found = read_outcome_file(results.parent / OUTCOMES) if (results.parent / OUTCOMES).is_file() else None
        df["outcome"] = -1
        manifest = manifest_beside(results)
        version = schema_version(manifest) if (manifest or {}).get("outcomes") else 1  # outcomes required where kept
        if found is not None:
            keys, top1, top5, subset = found
            local = keys[KEY_COLUMNS].assign(_row=np.arange(len(keys)))
            matched = df[KEY_COLUMNS].reset_index().merge(local, on=KEY_COLUMNS, how="inner")
            df.loc[matched["index"].to_numpy(), "outcome"] = matched["_row"].to_numpy()
            check_outcomes(df, top1, top5, subset.labels, results, results.parent / OUTCOMES, version, subset.tokens)
            used = np.unique(matched["_row"].to_numpy())
            renumber = np.full(len(keys), -1, np.int64)
            renumber[used] = offset + np.arange(len(used))
            df.loc[matched["index"].to_numpy(), "outcome"] = renumber[matched["_row"].to_numpy()]
            keys = keys.iloc[used].reset_index(drop=True)
            parts.append((keys, top1[used], top5[used], subset))
            offset += len(used)
        elif version >= 2:
            check_outcomes(
                df,
                np.zeros((0, 0), np.int32),
                np.zeros((0, 0), bool),
                np.zeros(0, np.int64),
                results,
                results.parent / OUTCOMES,
                version,
            )
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df["outcome"] = df["outcome"].astype(np.int64)
    return df, Outcomes.from_runs(parts)
