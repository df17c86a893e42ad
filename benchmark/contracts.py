"""One contract per plugin kind, checked when the registry collects contributions.

A kind's contract is a class: a :class:`typing.Protocol` (:class:`lesionbench.ModelSource`,
:class:`lesionbench.DatasetSource`) or a base class (:class:`lesionbench.Perturbation`,
:class:`lesionbench.StudyPreset`). A contribution fits it when it has every field the class annotates,
each of the annotated type, and every public method the class defines; a kind may add rules its types
cannot say (levels inside their range…) with a function named in :data:`RULES`. The registry refuses a
contribution that does not fit, with one line naming the plugin and what is wrong, and keeps the
others (:func:`lesionbench.registry.create_registry`).

Adding a kind (as the ``executors``, ``scores`` and ``reporters`` kinds do): name its contract class in
:data:`CONTRACTS`, ``"module:Class"``, imported when the kind is first collected.
"""

from __future__ import annotations

import importlib
import math
import types
import typing
from typing import Any

# kind -> "module:Class", the contract every contribution of the kind must fit
CONTRACTS: dict[str, str] = {
    "perturbations": "lesionbench.perturbation:Perturbation",
    "models": "lesionbench.model_sources:ModelSource",
    "datasets": "lesionbench.data:DatasetSource",
    "studies": "lesionbench.study:StudyPreset",
    "reporters": "lesionbench.reporters:Reporter",
    "executors": "lesionbench.executors:ExecutorPlugin",
    "scores": "lesionbench.layer_score:Score",
}
# kind -> "module:function": rules beyond the contract's types, function(obj) -> problem or ""
RULES: dict[str, str] = {
    "perturbations": "lesionbench.perturbation:contract_problem",
    "reporters": "lesionbench.reporters:contract_problem",
}
# str fields that must not be blank, by kind (a study preset's description may be)
NON_BLANK: dict[str, tuple[str, ...]] = {"studies": ("name",)}
_NON_BLANK_DEFAULT = ("name", "description")

_MISSING = object()


def _load(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def contract_of(kind: str) -> type:
    """The contract class of ``kind``; LookupError for a kind without one (a kind must have one)."""
    if kind not in CONTRACTS:
        raise LookupError(f"plugin kind {kind!r} has no contract class in lesionbench.contracts.CONTRACTS")
    return _load(CONTRACTS[kind])


def fields_of(contract: type) -> dict[str, Any]:
    """Field name -> type hint of every instance field ``contract`` annotates (ClassVars left out)."""
    hints = typing.get_type_hints(contract)
    return {name: hint for name, hint in hints.items() if typing.get_origin(hint) is not typing.ClassVar}


def methods_of(contract: type) -> list[str]:
    """The public methods ``contract`` (and its bases up to Protocol/object) defines."""
    names: list[str] = []
    for cls in contract.__mro__:
        if cls in (object, typing.Protocol, typing.Generic) or cls.__module__ == "typing":
            continue
        names += [n for n, v in vars(cls).items() if not n.startswith("_") and callable(v) and n not in names]
    return names


def problem(kind: str, obj: Any) -> str:
    """What keeps ``obj`` from fitting the contract of ``kind``, in one phrase; "" when it fits."""
    contract = contract_of(kind)
    for name, hint in fields_of(contract).items():
        value = getattr(obj, name, _MISSING)
        if value is _MISSING:
            return f"it has no field {name!r}"
        if not fits(value, hint):
            return f"field {name!r} must be {describe(hint)}, got {value!r}"
        if name in NON_BLANK.get(kind, _NON_BLANK_DEFAULT) and isinstance(value, str) and not value.strip():
            return f"field {name!r} must be a non-empty string"
    for name in methods_of(contract):
        if not callable(getattr(obj, name, None)):
            return f"it has no method {name!r}"
    return _load(RULES[kind])(obj) if kind in RULES else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the type ``hint``: str, bool, int, float (finite, not bool), ``X | None``,
    ``tuple[X, ...]`` / ``tuple[X, Y]`` (a tuple or list; the ellipsis form non-empty), or a class."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (float, int):
        return _is_number(value) and (hint is float or float(value).is_integer())
    if hint is bool:
        return isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return len(value) > 0 and all(fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
    if isinstance(origin, type):
        return isinstance(value, origin)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"contract field type {hint!r} is not one lesionbench.contracts can check")


def describe(hint: Any) -> str:
    """``hint`` in words, for a contract error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if hint is type(None):
        return "None"
    words = {str: "a string", bool: "a bool", int: "a whole number", float: "a finite number"}
    if hint in words:
        return words[hint]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a non-empty sequence of {describe(args[0]).removeprefix('a ')}s"
        return f"a sequence ({', '.join(describe(a) for a in args)})"
    cls = origin if isinstance(origin, type) else hint
    module = "lesionbench" if cls.__module__.startswith("lesionbench") else cls.__module__
    return f"a {module}.{cls.__qualname__}"
