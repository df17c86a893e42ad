"""The plugin manager: loads every ``lesionbench`` entry point and collects contributions by name.

Each plugin is loaded, and each of its hooks called, on its own, so that one broken plugin is
reported by name without hiding the others. Names must be unique per kind.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from benchmark import hookspecs
from benchmark.errors import PluginError, unknown_name

ENTRY_POINT_GROUP = hookspecs.PROJECT

# kind -> hook name; the kind is what `lesionbench list KIND` takes.
KINDS = {
    "models": "lesionbench_models",
    "perturbations": "lesionbench_perturbations",
    "datasets": "lesionbench_datasets",
    "studies": "lesionbench_studies",
}
SINGULAR = {"models": "model", "perturbations": "perturbation", "datasets": "dataset", "studies": "study"}


@dataclass(frozen=True)
class Contribution:
    """One named thing a plugin contributed."""

    name: str
    kind: str
    plugin: str
    obj: Any

    @property
    def description(self) -> str:
        """The first line of the contribution's description."""
        text = str(getattr(self.obj, "description", "") or "").strip()
        return text.splitlines()[0] if text else ""


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    stage: str
    message: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} failed during {self.stage}: {self.message}"


@dataclass
class Registry:
    pm: pluggy.PluginManager
    failures: list[PluginFailure] = field(default_factory=list)
    _cache: dict[str, dict[str, Contribution]] = field(default_factory=dict)

    def plugin_names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    def contributions(self, kind: str) -> dict[str, Contribution]:
        """All contributions of one kind, by name; raises PluginError on a clash."""
        if kind not in KINDS:
            raise unknown_name("kind", kind, KINDS)
        if kind not in self._cache:
            self._cache[kind] = self._collect(kind)
        return self._cache[kind]

    def _collect(self, kind: str) -> dict[str, Contribution]:
        caller = getattr(self.pm.hook, KINDS[kind])
        found: dict[str, Contribution] = {}
        for impl in reversed(caller.get_hookimpls()):  # registration order
            try:
                items = list(impl.function() or [])
            except Exception as exc:  # a broken plugin must not take the others down
                self.failures.append(PluginFailure(impl.plugin_name, KINDS[kind], _describe(exc)))
                continue
            for obj in items:
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    self.failures.append(
                        PluginFailure(impl.plugin_name, KINDS[kind], f"contributed {obj!r} without a name")
                    )
                    continue
                if name in found:
                    raise PluginError(
                        f"duplicate {SINGULAR[kind]} name {name!r}: contributed by plugin "
                        f"{found[name].plugin!r} and by plugin {impl.plugin_name!r}"
                    )
                found[name] = Contribution(name, kind, impl.plugin_name, obj)
        return found

    def get(self, kind: str, name: str) -> Any:
        items = self.contributions(kind)
        if name not in items:
            raise unknown_name(SINGULAR[kind], name, items)
        return items[name].obj

    def register(self, plugin: ModuleType | object, name: str | None = None) -> None:
        """Register a plugin object directly (tests, notebooks); entry points are the usual way."""
        self.pm.register(plugin, name=name)
        self._cache.clear()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def create_registry(extra_plugins: Iterable[tuple[str, object]] = (), entry_points: bool = True) -> Registry:
    """Build a registry from the ``lesionbench`` entry points plus any plugins given directly."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm)
    if entry_points:
        seen: set[tuple[str, str]] = set()
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if (ep.name, ep.value) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((ep.name, ep.value))
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:
                registry.failures.append(PluginFailure(ep.name, "load", _describe(exc)))
    for name, plugin in extra_plugins:
        try:
            pm.register(plugin, name=name)
        except Exception as exc:
            registry.failures.append(PluginFailure(name, "load", _describe(exc)))
    return registry


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry built from installed entry points (created on first use)."""
    global _default
    if _default is None:
        _default = create_registry()
    return _default
