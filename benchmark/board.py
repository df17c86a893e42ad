"""The leaderboard as plain data: what :func:`lesionbench.leaderboard.build_leaderboard` returns and
every reporter (Markdown, JSON, HTML, a plugin's) renders.

Everything here is computed already: bootstrapped intervals, ranks, verdicts, which perturbations
rank the models, the fragile layers. A reporter only formats it. Missing numbers are ``None``
(a score without an interval, a track without a mean); a critical level that was never reached is
``inf`` (``-inf`` on a descending axis's lower end). :func:`to_dict` / :func:`from_dict` turn a
:class:`Leaderboard` into JSON-ready dicts (``inf`` written as the string ``"inf"``) and back, so
``from_dict(to_dict(board)) == board``; the JSON Schema of that form ships as
``lesionbench/reporters/leaderboard.schema.json`` (:data:`SCHEMA`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from lesionbench.errors import LesionbenchError

SCHEMA = "lesionbench.leaderboard/1"  # the "schema" key of the JSON form; bump on an incompatible change


@dataclass
class Score:
    """A score with its 95% bootstrap interval (``low``/``high`` None without one)."""

    value: float | None
    low: float | None = None
    high: float | None = None


@dataclass
class Weakest:
    """A model's weakest layer over the ranked perturbations."""

    layer: str
    score: float | None
    perturbation: str


@dataclass
class Entry:
    """One ranked model of a track. ``rank`` is None when the track ranks no perturbation;
    ``perturbations`` maps each ranked perturbation → the mean layer score under it; ``draws`` the
    (fewest, most) random draws behind a level (None: no cells); ``study_seconds`` the evaluation
    time under the ranked perturbations (s); ``page`` the model's page slug (``dataset--model``)."""

    model: str
    page: str
    rank: int | None
    clean_top1: float | None
    clean_top5: float | None
    overall: Score
    perturbations: dict[str, Score]
    weakest: Weakest | None
    first_layer: float | None
    last_layer: float | None
    n_images: int
    draws: list[int] | None
    images_per_s: float | None
    device: str
    study_seconds: float


@dataclass
class Unscored:
    """A model whose clean accuracy is not beyond chance: not scored. ``clean`` is the track's metric."""

    model: str
    page: str
    clean_top1: float | None
    clean_top5: float | None
    clean: float
    n_images: float
    chance: float


@dataclass
class Grid:
    """The level grid one perturbation used; ``models`` None: every model of the track."""

    perturbation: str
    models: list[str] | None
    levels: list[float]
    unit: str


@dataclass
class Depth:
    """Where the fragile layers are under one perturbation: the mean layer score of the first,
    middle and last third of the studied layers, and the single most fragile layer."""

    perturbation: str
    models: int
    early: float | None
    middle: float | None
    late: float | None
    fragile_model: str
    fragile_layer: str
    fragile_score: float | None


@dataclass
class ClassScore:
    name: str
    retention: float


@dataclass
class ClassHurt:
    """The classes a model's most fragile layer under one perturbation hurts most (and least)."""

    model: str
    perturbation: str
    layer: str
    most: list[ClassScore]
    least: ClassScore


@dataclass
class ClassDamage:
    """Per-class damage of a track: ``hurt`` is empty when ``fewest`` < ``minimum`` images per class."""

    fewest: int
    most: int
    minimum: int
    hurt: list[ClassHurt]


@dataclass
class Cell:
    """One layer under one perturbation: its score, verdict and critical level p½."""

    score: Score
    verdict: str
    critical: Score
    max_level: float
    axis: str


@dataclass
class LayerRow:
    layer: str
    index: int
    depth: float | None
    cells: dict[str, Cell]


@dataclass
class LayerTable:
    """Layers × perturbations that studied the same layers (one narrow table)."""

    perturbations: list[str]
    rows: list[LayerRow]


@dataclass
class Fragile:
    """The most fragile layer under one perturbation; ``apart``: whether the bootstrap tells it from
    the runner-up (None without a bootstrap)."""

    perturbation: str
    layer: str
    score: Score
    verdict: str
    runner_up: str | None = None
    runner_up_score: float | None = None
    apart: bool | None = None


@dataclass
class Link:
    label: str
    path: str  # relative to the leaderboard's main document


@dataclass
class ModelPage:
    """A model's details on one track: fragile layers, layer tables, plots (or why it is unscored)."""

    model: str
    page: str
    fragile: list[Fragile] = field(default_factory=list)
    tables: list[LayerTable] = field(default_factory=list)
    plots: list[Link] = field(default_factory=list)
    unscored: Unscored | None = None


@dataclass
class Track:
    """One dataset: ranked perturbations (``ranked``), those left out (``partial``: not run on every
    model; ``regridded``: run on different grids), ranked entries, unscored models, the headline
    figure's path and the details."""

    dataset: str
    title: str
    metric: str
    ranked: list[str]
    partial: list[str]
    regridded: list[str]
    entries: list[Entry]
    unscored: list[Unscored]
    headline: str | None
    grids: list[Grid]
    depth: list[Depth]
    class_damage: ClassDamage | None
    models: list[ModelPage]


@dataclass
class BootstrapInfo:
    method: str
    replicates: int
    seed: int


@dataclass
class Leaderboard:
    """The whole leaderboard: tracks sorted by dataset; ``bootstrap`` None when no score has an interval."""

    title: str
    sources: list[str]
    bootstrap: BootstrapInfo | None
    tracks: list[Track]
    schema: str = SCHEMA


def num(x: Any) -> float | None:
    """A float, or None for a missing number (None, NaN)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) or x != x else float(x)


def to_dict(board: Leaderboard) -> dict:
    """``board`` as JSON-ready dicts and lists (``inf`` as ``"inf"``, ``-inf`` as ``"-inf"``)."""
    return _encode(dataclasses.asdict(board))


def from_dict(data: dict) -> Leaderboard:
    """The inverse of :func:`to_dict`; raises LesionbenchError for another schema or a malformed document."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise LesionbenchError(f"not a {SCHEMA} leaderboard (schema {found!r})")
    try:
        return _decode(Leaderboard, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise LesionbenchError(f"malformed {SCHEMA} leaderboard: {type(exc).__name__}: {exc}") from None


def _encode(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else v)
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(tp: Any, v: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if v is None:
        if type(None) in args:
            return None
        raise ValueError(f"null where a {tp} is needed")
    if args and type(None) in args:  # X | None with a value
        return _decode(next(a for a in args if a is not type(None)), v)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _decode(hints[f.name], v[f.name]) for f in dataclasses.fields(tp) if f.name in v})
    if origin is list:
        return [_decode(args[0], x) for x in v]
    if origin is dict:
        return {str(k): _decode(args[1], x) for k, x in v.items()}
    if tp is float:
        return float(v) if not isinstance(v, bool) else _bad(tp, v)
    if tp is int:
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else _bad(tp, v)
    if tp is str or tp is bool:
        return v if isinstance(v, tp) else _bad(tp, v)
    raise TypeError(f"cannot decode {tp}")


def _bad(tp: Any, v: Any) -> Any:
    raise ValueError(f"{v!r} is not a {tp.__name__}")


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of :func:`to_dict`'s form, derived from the dataclasses
    above; shipped as ``lesionbench/reporters/leaderboard.schema.json`` (a test keeps the two equal)."""
    defs: dict[str, dict] = {}

    def of(tp: Any) -> dict:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if args and type(None) in args:
            return {"anyOf": [of(next(a for a in args if a is not type(None))), {"type": "null"}]}
        if dataclasses.is_dataclass(tp):
            if tp.__name__ not in defs:
                defs[tp.__name__] = {}  # a placeholder while its fields are described
                hints = typing.get_type_hints(tp)
                props = {f.name: of(hints[f.name]) for f in dataclasses.fields(tp)}
                defs[tp.__name__] = {
                    "type": "object",
                    "properties": props,
                    "required": list(props),
                    "additionalProperties": False,
                    "description": (tp.__doc__ or "").strip(),
                }
            return {"$ref": f"#/$defs/{tp.__name__}"}
        if origin is list:
            return {"type": "array", "items": of(args[0])}
        if origin is dict:
            return {"type": "object", "additionalProperties": of(args[1])}
        if tp is float:
            return {"anyOf": [{"type": "number"}, {"enum": ["inf", "-inf"]}]}
        return {int: {"type": "integer"}, str: {"type": "string"}, bool: {"type": "boolean"}}[tp]

    root = of(Leaderboard)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA,
        "title": "lesionbench leaderboard",
        **defs["Leaderboard"],
        "$defs": {k: v for k, v in sorted(defs.items()) if k != "Leaderboard"},
    }
    schema["properties"]["schema"] = {"const": SCHEMA}
    del root
    return schema
