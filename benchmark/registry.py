"""The plugin manager: built-ins from an import list, third parties from entry points.

As in pytest, the built-in plugins are plain modules named in :data:`BUILTIN_PLUGINS` and
registered first; third-party packages add theirs under the ``lesionbench`` entry-point group.
Each plugin is loaded, and each of its hooks called, on its own, so that one plugin that fails to
import or whose hook raises is reported by name without hiding the others. A plugin that
implements a hook lesionbench does not define (a misspelling such as ``lesionbench_perturbation``)
is refused by pluggy's own ``check_pending`` and reported by name. Every contribution is checked
against its kind's contract (:mod:`lesionbench.contracts`: one Protocol or base class per kind) as
it is collected; one that breaks it (a missing or ill-typed field, a missing method) is refused
with one line naming the plugin and what is wrong, and the others stay: a broken plugin hurts only
itself. Asking for a refused contribution by name stops the command with that line.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from lesionbench import __version__, contracts, hookspecs
from lesionbench.errors import PluginError, unknown_name

ENTRY_POINT_GROUP = hookspecs.PROJECT

# Plugin name -> module: lesionbench's own plugins, registered before any third party's.
BUILTIN_PLUGINS = {
    "synapse_knockout": "lesionbench.plugins.synapse_knockout",
    "node_knockout": "lesionbench.plugins.node_knockout",
    "weight_noise": "lesionbench.plugins.weight_noise",
    "weight_draw": "lesionbench.plugins.weight_draw",
    "magnitude_prune": "lesionbench.plugins.magnitude_prune",
    "bit_flip": "lesionbench.plugins.bit_flip",
    "stuck_at": "lesionbench.plugins.stuck_at",
    "quantize": "lesionbench.plugins.quantize",
    "reinit": "lesionbench.plugins.reinit",
    "activation_damage": "lesionbench.plugins.activation_damage",
    "filter_prune": "lesionbench.plugins.filter_prune",
    "activation_bit_flip": "lesionbench.plugins.activation_bit_flip",
    "block_removal": "lesionbench.plugins.block_removal",
    "head_knockout": "lesionbench.plugins.head_knockout",
    "mlp_neuron_knockout": "lesionbench.plugins.mlp_neuron_knockout",
    "block_drop": "lesionbench.plugins.block_drop",
    "super_weight": "lesionbench.plugins.super_weight",
    "text": "lesionbench.plugins.text",
    "fashion_mnist": "lesionbench.plugins.fashion_mnist",
    "image_folder": "lesionbench.plugins.image_folder",
    "synthetic": "lesionbench.plugins.synthetic",
    "studies": "lesionbench.plugins.studies",
    "fashion": "lesionbench.models.fashion",
    "torchvision": "lesionbench.models.torchvision_models",
    "timm": "lesionbench.models.timm_models",
    "efficientnet_lite": "lesionbench.models.efficientnet_lite",
    "int8": "lesionbench.models.int8",
    "huggingface": "lesionbench.models.huggingface",
    # reporters (issue #26): the leaderboard's output formats
    "markdown": "lesionbench.reporters.markdown",
    "json": "lesionbench.reporters.json_report",
    "html": "lesionbench.reporters.html_report",
}
# executors and scores (issue #26): the built-in ones are plugins like the rest
BUILTIN_PLUGINS |= {
    "local": "lesionbench.executors.local",
    "ray": "lesionbench.executors.ray",
    "area_score": "lesionbench.plugins.area_score",
}

# kind -> hook name; the kind is what `lesionbench list KIND` takes.
KINDS = {
    "models": "lesionbench_models",
    "perturbations": "lesionbench_perturbations",
    "datasets": "lesionbench_datasets",
    "studies": "lesionbench_studies",
}
SINGULAR = {"models": "model", "perturbations": "perturbation", "datasets": "dataset", "studies": "study"}
# reporters (issue #26)
KINDS["reporters"] = "lesionbench_reporters"
SINGULAR["reporters"] = "reporter"
# executors and scores (issue #26)
KINDS |= {"executors": "lesionbench_executors", "scores": "lesionbench_scores"}
SINGULAR |= {"executors": "executor", "scores": "score"}


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


@dataclass(frozen=True)
class PluginInfo:
    """Where a loaded plugin comes from: its module and the distribution that installed it."""

    name: str
    module: str
    distribution: str  # "-" for a plugin registered directly (tests, notebooks)
    version: str


@dataclass
class Registry:
    pm: pluggy.PluginManager
    failures: list[PluginFailure] = field(default_factory=list)
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    _cache: dict[str, dict[str, Contribution]] = field(default_factory=dict)
    refused: dict[str, dict[str, PluginFailure]] = field(default_factory=dict)  # kind -> name -> why

    def plugin_names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    def info(self, name: str) -> PluginInfo:
        """Module, distribution and version of a loaded plugin."""
        if name in self.infos:
            return self.infos[name]
        plugin = self.pm.get_plugin(name)
        module = getattr(plugin, "__name__", type(plugin).__module__)
        return PluginInfo(name, module, "-", "-")

    def contributions(self, kind: str) -> dict[str, Contribution]:
        """All contributions of one kind that fit its contract, by name; raises PluginError on a name clash."""
        if kind not in KINDS:
            raise unknown_name("kind", kind, KINDS)
        if kind not in self._cache:
            self._cache[kind] = self._collect(kind)
        return self._cache[kind]

    def _collect(self, kind: str) -> dict[str, Contribution]:
        contracts.contract_of(kind)  # a kind without a contract is lesionbench's bug, not a plugin's: raise
        caller = getattr(self.pm.hook, KINDS[kind])
        found: dict[str, Contribution] = {}
        for impl in reversed(caller.get_hookimpls()):  # registration order
            try:
                items = list(impl.function() or [])
            except Exception as exc:  # a broken plugin must not take the others down
                self.failures.append(PluginFailure(impl.plugin_name, KINDS[kind], _describe(exc)))
                continue
            for obj in items:
                try:
                    problem = contract_problem(kind, obj)
                except Exception as exc:  # a field that raises when read: the contribution's own bug
                    problem = f"reading it raised {_describe(exc)}"
                if problem:
                    failure = PluginFailure(
                        impl.plugin_name,
                        KINDS[kind],
                        f"contributed a {SINGULAR[kind]} {_label(obj)}that breaks the contract: {problem}",
                    )
                    self.failures.append(failure)
                    if isinstance(getattr(obj, "name", None), str):
                        self.refused.setdefault(kind, {})[obj.name] = failure
                    continue
                name = obj.name
                if name in found:
                    raise PluginError(
                        f"duplicate {SINGULAR[kind]} name {name!r}: contributed by plugin "
                        f"{found[name].plugin!r} and by plugin {impl.plugin_name!r}"
                    )
                found[name] = Contribution(name, kind, impl.plugin_name, obj)
        return found

    def owner(self, kind: str, name: str) -> str:
        """The plugin that contributed ``name`` of ``kind``."""
        return self.contributions(kind)[name].plugin

    def get(self, kind: str, name: str) -> Any:
        items = self.contributions(kind)
        if name not in items and name in self.refused.get(kind, {}):
            raise PluginError(str(self.refused[kind][name]))
        if name not in items:
            raise unknown_name(SINGULAR[kind], name, items)
        return items[name].obj

    def register(self, plugin: ModuleType | object, name: str | None = None) -> None:
        """Register a plugin object directly (tests, notebooks); entry points are the usual way."""
        _register(self, plugin, name or _default_name(plugin), PluginInfo(name or "-", _module_of(plugin), "-", "-"))
        self._cache.clear()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _label(obj: object) -> str:
    name = getattr(obj, "name", None)
    return f"{name!r} " if isinstance(name, str) and name else ""


def _module_of(plugin: object) -> str:
    return getattr(plugin, "__name__", type(plugin).__module__)


def _default_name(plugin: object) -> str:
    return _module_of(plugin) if isinstance(plugin, ModuleType) else str(id(plugin))


# ------------------------------------------------------------------------------------ contracts


def contract_problem(kind: str, obj: Any) -> str:
    """What is wrong with a contribution of ``kind``, in one phrase; "" when it fits the contract
    (:func:`lesionbench.contracts.problem`)."""
    return contracts.problem(kind, obj)


# ------------------------------------------------------------------------------------ loading


def _register(registry: Registry, plugin: object, name: str, info: PluginInfo) -> bool:
    """Register one plugin, then let pluggy check it implements only hooks lesionbench defines."""
    try:
        registry.pm.register(plugin, name=name)
    except Exception as exc:
        registry.failures.append(PluginFailure(name, "load", _describe(exc)))
        return False
    try:
        registry.pm.check_pending()  # every plugin before this one passed: a failure is this one's
    except pluggy.PluginValidationError as exc:
        registry.pm.unregister(name=name)
        registry.failures.append(PluginFailure(name, "load", _unknown_hook(str(exc))))
        return False
    registry.infos[name] = info
    return True


def _unknown_hook(message: str) -> str:
    """pluggy's message for an unknown hook, with the closest real hook name."""
    import difflib
    import re

    found = re.search(r"unknown hook '([^']+)'", message)
    if not found:
        return message
    close = difflib.get_close_matches(found.group(1), KINDS.values(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"implements unknown hook {found.group(1)!r}{hint} (the hooks are {', '.join(KINDS.values())})"


def create_registry(
    extra_plugins: Iterable[tuple[str, object]] = (),
    entry_points: bool = True,
    builtins: bool = True,
    disable: Iterable[str] = (),
) -> Registry:
    """Build a registry: the built-ins, then the ``lesionbench`` entry points, then ``extra_plugins``.

    ``disable``: plugin names (built-in or entry point) left out, as pytest's ``-p no:NAME``;
    what they contribute is then unknown. Raises PluginError for a name no plugin has.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm)
    disable = set(disable)
    if disable - set(BUILTIN_PLUGINS) - {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}:
        raise unknown_name("plugin to disable", sorted(disable - set(BUILTIN_PLUGINS))[0], BUILTIN_PLUGINS)
    if builtins:
        for name, module in BUILTIN_PLUGINS.items():
            if name in disable:
                continue
            try:
                plugin = importlib.import_module(module)
            except Exception as exc:  # a model family whose optional dependency is missing, say
                registry.failures.append(PluginFailure(name, "load", _describe(exc)))
                continue
            _register(registry, plugin, name, PluginInfo(name, module, "lesionbench", __version__))
    if entry_points:
        seen: set[tuple[str, str]] = set()
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if (ep.name, ep.value) in seen or ep.name in disable:  # the same distribution visible twice on sys.path
                continue
            seen.add((ep.name, ep.value))
            try:
                plugin = ep.load()
            except Exception as exc:
                registry.failures.append(PluginFailure(ep.name, "load", _describe(exc)))
                continue
            dist = ep.dist
            info = PluginInfo(ep.name, ep.value, dist.name if dist else "-", dist.version if dist else "-")
            _register(registry, plugin, ep.name, info)
    for name, plugin in extra_plugins:
        if name in disable:
            continue
        _register(registry, plugin, name, PluginInfo(name, _module_of(plugin), "-", "-"))
    return registry


_default: Registry | None = None
_disabled: frozenset[str] = frozenset()


def get_registry(disable: Iterable[str] | None = None) -> Registry:
    """The process-wide registry: built-ins and installed entry points (created on first use).

    ``disable``: plugin names left out (``lesionbench -p no:NAME``); giving a different set than the
    registry in use was built with builds it again, and later calls without ``disable`` keep it.
    """
    global _default, _disabled
    wanted = _disabled if disable is None else frozenset(disable)
    if _default is None or wanted != _disabled:
        _default, _disabled = create_registry(disable=wanted), wanted  # a bad name leaves the last one in use
    return _default
