"""The results schema: what every ``results.csv`` must satisfy before a number in it is used.

Checked on every read (``--resume``, ``leaderboard``, ``compare``, ``load_results``, ``verify``):

* **types and ranges** (a :mod:`pandera` schema): numbers where numbers belong; 0 ≤ top-1 ≤ top-5 ≤ 1;
  a finite, non-negative loss unless the row records an error (``error`` not empty); whole
  numbers for draws, layer indices, image and class counts; fractions in [0, 1];
* **one row per cell**: no two rows share (model, dataset, layer, perturbation, level, draw);
* **rows of the manifest's study**: the dataset and perturbations the manifest names, draws below
  its cap; on ``--resume`` each row must be a cell of the plan itself (:func:`check_plan`);
* **rows bound to their run** (results schema 2, recorded in the manifest as ``results_schema``;
  a manifest without it is schema 1, the files written before): each row ends with ``run``, the
  fingerprint of the plan that wrote it (it must equal the manifest's), and ``checksum``, the
  first 16 hex digits of SHA-256 over the run and the row's other fields as written, so a row
  copied from another run, edited by hand or torn at the end is refused, not scored;
* **rows consistent with their per-image outcomes** (:func:`check_outcomes`): a row's top-1/top-5
  is the fraction of its outcomes' images that are right; in schema 2 every row without an error
  has outcomes.

A violation raises :class:`SchemaViolation` (a LesionbenchError: one line naming the file, the
row and the field, exit 2 from the command line).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionbench.columns import CLEAN, KEY_COLUMNS, MANIFEST, OPTIONAL
from lesionbench.errors import LesionbenchError

RESULTS_SCHEMA = 2  # the version new runs record in their manifest
BINDING = ["run", "checksum"]  # the last two columns of a schema-2 results file
METRICS = ("top1", "top5")
BN_SUFFIX = "+bn_recalibrate"  # as lesionbench.plan names a recalibrated condition (not imported: plan imports torch)


class SchemaViolation(LesionbenchError):
    """A result file that is not what lesionbench wrote (one line: file, row, field)."""


def row_checksum(run: str, cells: Sequence[str]) -> str:
    """The checksum of a row: 16 hex digits of SHA-256 over ``run`` and the row's other fields,
    each exactly as written in the CSV, joined by the unit separator (U+001F)."""
    return hashlib.sha256("\x1f".join([run, *cells]).encode("utf-8")).hexdigest()[:16]


def schema_version(manifest: dict | None) -> int:
    """The results schema a run's manifest declares (1 when it declares none: files written before)."""
    return int((manifest or {}).get("results_schema", 1))


def read_manifest(path: Path) -> dict | None:
    """The manifest beside a results file (None when there is none); a damaged manifest or one
    naming an unknown metric or schema is refused in one line (:class:`SchemaViolation`).

    Every results schema from 1 (no ``results_schema`` key: the files written before it was
    recorded) to :data:`RESULTS_SCHEMA` is read; a later one (a run written by a newer lesionbench)
    is refused rather than misread."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        study = manifest["study"]
        metric = study.get("metric", "top1")
        version = manifest.get("results_schema", 1)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise SchemaViolation(f"{str(path)!r} is unreadable or damaged ({type(exc).__name__}: {exc})") from None
    if metric not in METRICS:
        raise SchemaViolation(f"{str(path)!r}, field study.metric: {metric!r} is not a metric (top1 or top5)")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SchemaViolation(
            f"{str(path)!r}, field results_schema: {version!r} is not a results schema (a whole "
            f"number, 1 to {RESULTS_SCHEMA} for this lesionbench)"
        )
    if version > RESULTS_SCHEMA:
        raise SchemaViolation(
            f"{str(path)!r}, field results_schema: {version} is newer than this lesionbench reads "
            f"(1 to {RESULTS_SCHEMA}); the run was written by a newer lesionbench: upgrade to read it"
        )
    return manifest


def _where(path: Path, raw: pd.DataFrame, i: int) -> str:
    row = raw.iloc[i]
    cell = "/".join(str(row.get(c, "?")) for c in KEY_COLUMNS)
    return f"results file {str(path)!r}, row {i + 1} (line {i + 2}, cell {cell})"


def _whole(s: pd.Series) -> pd.Series:
    return s == np.round(s)


def _pandera():
    import pandera.pandas as pa

    def num(*checks, nullable: bool = True):
        return pa.Column(float, list(checks), coerce=True, nullable=nullable, required=False)

    fraction = pa.Check.in_range(0, 1)
    whole = pa.Check(_whole, name="a whole number", error="a whole number")
    text = pa.Column(str, pa.Check.str_length(min_value=1), required=True)
    has_error = lambda d: d["error"].fillna("") != ""  # noqa: E731
    return pa.DataFrameSchema(
        {
            "model": text,
            "dataset": text,
            "perturbation": text,
            "layer_index": num(pa.Check.ge(-1), whole),
            "relative_depth": num(fraction),
            "level": num(pa.Check(np.isfinite, name="finite", error="finite"), nullable=False),
            "draw": num(pa.Check.ge(0), whole, nullable=False),
            "seed": pa.Column("Int64", coerce=True, nullable=True),
            "top1": num(fraction),
            "top5": num(fraction),
            "loss": num(pa.Check.ge(0)),
            "n_images": num(pa.Check.ge(1), whole),
            "seconds": num(pa.Check.ge(0)),
            "images_per_s": num(pa.Check.ge(0)),
            "num_classes": num(pa.Check.ge(1), whole),
            "nonfinite_weights": num(pa.Check.ge(0), whole),
            "nonfinite_outputs": num(pa.Check.ge(0), whole),
            "flip_rate": num(fraction),
            "chance_top1": num(fraction),
            "chance_top5": num(fraction),
        },
        checks=[
            pa.Check(lambda d: ~(d["top1"] > d["top5"]), name="top1 ≤ top5", error="top1 ≤ top5"),
            pa.Check(lambda d: d["top1"].notna() | has_error(d), name="top1 given", error="top1 given"),
            pa.Check(lambda d: d["top5"].notna() | has_error(d), name="top5 given", error="top5 given"),
            pa.Check(lambda d: np.isfinite(d["loss"]) | has_error(d), name="loss finite", error="loss finite"),
        ],
    )


_SCHEMA = None
_FIELD_OF = {"top1 ≤ top5": "top1", "top1 given": "top1", "top5 given": "top5", "loss finite": "loss"}
_WHY = {
    "top1 ≤ top5": "is above top5",
    "top1 given": "is missing in a row that records no error",
    "top5 given": "is missing in a row that records no error",
    "loss finite": "is not a finite number in a row that records no error",
}


def check_rows(raw: pd.DataFrame, path: Path, manifest: dict | None, torn: bool = False) -> None:
    """Check a results file read as text (``raw``: every field a str, as written) against the
    schema of its manifest's version; raises :class:`SchemaViolation` on the first problem."""
    global _SCHEMA
    import pandera.pandas as pa

    path = Path(path)
    if torn:
        raise SchemaViolation(
            f"results file {str(path)!r}, row {len(raw)} (line {len(raw) + 1}), every field: the "
            "last line is torn (no line end); finish the run with lesionbench run --resume"
        )
    _check_binding(raw, path, manifest)
    raw = raw.assign(**{c: "" for c in OPTIONAL if c not in raw.columns})  # older files lack these
    numbers = raw.replace({"": np.nan, "nan": np.nan, "NaN": np.nan})
    for c in ("model", "dataset", "perturbation", "error"):
        if c in raw:
            numbers[c] = raw[c]
    if _SCHEMA is None:
        _SCHEMA = _pandera()
    try:
        typed = _SCHEMA.validate(numbers, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        located = cases[cases["index"].notna()].copy()
        if located.empty:
            first = cases.iloc[0]
            raise SchemaViolation(
                f"results file {str(path)!r}, field {first['column']}: fails {first['check']}"
            ) from None
        located["index"] = located["index"].astype(int)
        first = located.sort_values("index", kind="stable").iloc[0]
        check = str(first["check"])
        field = _FIELD_OF.get(check) or (first["column"] if isinstance(first["column"], str) else "?")
        value = raw.iloc[first["index"]].get(field, "")
        why = _WHY.get(check) or (
            f"{value!r} is not a number" if check.startswith(("coerce_dtype", "dtype")) else f"{value!r} fails {check}"
        )
        if check in _WHY:
            why = f"{value!r} {why}"
        raise SchemaViolation(f"{_where(path, raw, first['index'])}, field {field}: {why}") from None
    keys = typed[["model", "dataset", "layer", "perturbation", "level", "draw"]].fillna("")
    repeated = keys.duplicated(keep=False).to_numpy()
    if repeated.any():
        first, second = np.flatnonzero(repeated)[:2]
        raise SchemaViolation(
            f"{_where(path, raw, int(second))}, field {'/'.join(KEY_COLUMNS)}: repeats the cell of "
            f"row {first + 1}; a cell has one row"
        )
    _check_study(raw, typed, path, manifest)


def _check_binding(raw: pd.DataFrame, path: Path, manifest: dict | None) -> None:
    version = schema_version(manifest)
    bound = all(c in raw.columns for c in BINDING)
    if version >= 2 and not bound:
        raise SchemaViolation(
            f"results file {str(path)!r}, header, field run/checksum: missing, but its manifest "
            f"declares results schema {version}, whose rows carry them (a file from another run?)"
        )
    if not bound:
        return
    if list(raw.columns[-2:]) != BINDING:
        raise SchemaViolation(f"results file {str(path)!r}, header, field run/checksum: not the last two columns")
    fields = [c for c in raw.columns if c not in BINDING]
    cells = raw[fields].to_numpy(dtype=object)
    expected = manifest.get("fingerprint") if manifest else raw["run"].iloc[0] if len(raw) else None
    for i, (run, checksum) in enumerate(zip(raw["run"], raw["checksum"])):
        if run != expected:
            raise SchemaViolation(
                f"{_where(path, raw, i)}, field run: {run!r} is not this run's fingerprint "
                f"{expected!r} (a row from another run)"
            )
        if checksum != row_checksum(run, cells[i]):
            raise SchemaViolation(
                f"{_where(path, raw, i)}, field checksum: does not match the row (edited, or torn at the end)"
            )


def _check_study(raw: pd.DataFrame, typed: pd.DataFrame, path: Path, manifest: dict | None) -> None:
    """Rows outside the manifest's study: another dataset, a perturbation it does not name, a draw beyond its cap."""
    study = (manifest or {}).get("study")
    if not isinstance(study, dict):
        return
    dataset = (study.get("dataset") or {}).get("name")
    names = {p if isinstance(p, str) else (p or {}).get("name") for p in study.get("perturbations") or []}
    cap = (
        max(int(study["draws"]), int(study.get("max_draws", 0)) if study.get("target_ci") is not None else 0)
        if "draws" in study
        else float("inf")
    )
    for i, (d, p, draw) in enumerate(zip(typed["dataset"], typed["perturbation"], typed["draw"])):
        if dataset is not None and d != dataset:
            raise SchemaViolation(f"{_where(path, raw, i)}, field dataset: {d!r} is not the manifest's {dataset!r}")
        if p != CLEAN and names and p.removesuffix(BN_SUFFIX) not in names:
            raise SchemaViolation(
                f"{_where(path, raw, i)}, field perturbation: {p!r} is not one the manifest's study names"
            )
        if draw >= cap:
            raise SchemaViolation(f"{_where(path, raw, i)}, field draw: {int(draw)} is beyond the study's {cap} draws")


def check_plan(df: pd.DataFrame, plan, path: Path) -> None:
    """On ``--resume``: every row must be a cell of ``plan`` (the clean pass of one of its models,
    or a layer × perturbation × level of a block, with a draw below the study's cap)."""
    study = plan.study
    cap = max(study.draws, study.max_draws if study.target_ci is not None else 0)
    allowed = set()
    for prepared in plan.models:
        name = prepared.loaded.name
        allowed.add((name, "", CLEAN, 0.0))
        for cell in plan.cells(prepared):
            allowed.add(plan.key(name, cell)[:4])
    for i, key in enumerate(zip(df["model"], df["layer"], df["perturbation"], df["level"].astype(float))):
        if key not in allowed:
            raise SchemaViolation(
                f"{_where(path, df, i)}, field {'/'.join(KEY_COLUMNS[:4])}: not a cell of the study "
                "recorded in the manifest (rows of another study?)"
            )
        if df["draw"].iloc[i] >= cap:
            raise SchemaViolation(f"{_where(path, df, i)}, field draw: beyond the study's {cap} draws")


def check_outcomes(
    df: pd.DataFrame,
    top1: np.ndarray,
    top5: np.ndarray,
    labels: np.ndarray,
    path: Path,
    outcomes_path: Path,
    version: int,
    tokens: int | None = None,
) -> None:
    """Each row with per-image outcomes (``df["outcome"]`` ≥ 0, a row of ``top1``/``top5``, int32 and
    bool [cells, images], ``labels`` int64 [images]) must state the accuracy they give: top-1 =
    (images whose prediction is the label) / (images evaluated, prediction ≥ 0), top-5 likewise, and
    ``n_images`` = images evaluated. Text windows (``tokens`` = T next-token predictions each) hold
    hit counts instead: top-1 = (top-1 hits) / (T · windows evaluated, count ≥ 0), top-5 likewise.
    In schema 2 a row without an error must have outcomes."""
    has = df["outcome"].to_numpy() >= 0
    if version >= 2:
        lacking = np.flatnonzero(~has & (df["error"].to_numpy() == ""))
        if lacking.size:
            raise SchemaViolation(
                f"{_where(path, df, int(lacking[0]))}, field outcome: no per-image outcomes in "
                f"{str(outcomes_path)!r} (finish the run with lesionbench run --resume)"
            )
    rows = np.flatnonzero(has)
    if not rows.size:
        return
    t1, t5 = top1[df["outcome"].to_numpy()[rows]], top5[df["outcome"].to_numpy()[rows]]
    seen = t1 >= 0
    n = seen.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if tokens:  # hit counts per window
            right1 = np.where(seen, t1, 0).sum(axis=1) / (n * tokens)
            right5 = np.where(seen, t5, 0).sum(axis=1) / (n * tokens)
        else:
            right1 = ((t1 == labels[None, :]) & seen).sum(axis=1) / n
            right5 = (t5 & seen).sum(axis=1) / n
    for column, value in (("top1", right1), ("top5", right5), ("n_images", n)):
        stated = df[column].to_numpy(float)[rows]
        bad = np.flatnonzero(~np.isclose(stated, value, rtol=0, atol=1e-12) & ~np.isnan(stated))
        if bad.size:
            i = int(bad[0])
            raise SchemaViolation(
                f"{_where(path, df, int(rows[i]))}, field {column}: {stated[i]!r} disagrees with its "
                f"per-image outcomes in {str(outcomes_path)!r}, which give {float(value[i])!r}"
            )


def manifest_beside(results: Path) -> dict | None:
    return read_manifest(Path(results).parent / MANIFEST)
