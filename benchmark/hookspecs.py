"""The hooks a lesionbench plugin may implement.

Every built-in model, perturbation, dataset and study preset is contributed through these hooks,
from modules named in :data:`lesionbench.registry.BUILTIN_PLUGINS`; a third-party package adds its
own under the ``lesionbench`` entry-point group in its ``pyproject.toml``::

    [project.entry-points.lesionbench]
    my_plugin = "my_package.my_plugin"

A plugin is a plain module with ``@hookimpl`` functions::

    from lesionbench import WeightPerturbation, hookimpl

    @hookimpl
    def lesionbench_perturbations():
        return [MyPerturbation(name="my_damage", ...)]

Each hook is called once per process, when its kind is first needed, with no arguments. A
function named like a hook but not defined here (``lesionbench_perturbation``) is refused when
the plugin loads, and reported by plugin name. What a hook returns is checked against its kind's
contract (:mod:`lesionbench.contracts`: the class named in each hook below) as it is collected: a
contribution with a missing or ill-typed field or method is left out and reported in one line naming
the plugin and the field (``lesionbench plugins``; a study that asks for it by name stops with that
line, exit code 2). If the hook itself raises, that plugin's contributions of that kind are left out
and the failure is reported by name; the other plugins are unaffected.
:mod:`lesionbench.testing` checks a contribution against more of its contract (determinism,
restoration…) in a plugin's own tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from lesionbench.data import DatasetSource
    from lesionbench.executors import ExecutorPlugin
    from lesionbench.layer_score import Score
    from lesionbench.model_sources import ModelSource
    from lesionbench.perturbation import Perturbation
    from lesionbench.reporters import Reporter
    from lesionbench.study import StudyPreset

PROJECT = "lesionbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lesionbench_perturbations() -> Sequence[Perturbation]:
    """Return the perturbations this plugin contributes.

    Each is a :class:`lesionbench.WeightPerturbation` (``apply(layer, level, generator)`` damages
    the layer's tensors in place) or a :class:`lesionbench.HookPerturbation` (``hooks(layer, level,
    generator)`` installs forward hooks), with a unique ``name``, a ``description``, its
    ``default_levels`` inside ``level_range`` and a :class:`lesionbench.LevelAxis`. The harness
    restores the layer bit for bit after every cell. An exception raised by ``apply``/``hooks``
    fails that cell only: its row records the error and the study goes on.
    """


@hookspec
def lesionbench_models() -> Sequence[ModelSource]:
    """Return the model sources this plugin contributes.

    A source owns a prefix (``timm`` in ``timm:resnet18``) and may also claim bare names
    (``fashion_alexnet``); ``build(spec)`` returns a :class:`lesionbench.LoadedModel` (the module in
    eval mode plus the preprocessing its weights expect). A :class:`lesionbench.LesionbenchError`
    from ``build`` stops the study before anything is written, with its message.
    """


@hookspec
def lesionbench_datasets() -> Sequence[DatasetSource]:
    """Return the dataset sources this plugin contributes.

    ``load(path, split)`` returns a :class:`lesionbench.RawDataset`: labels and a decoder. The
    harness picks the evaluation subset and applies each model's own preprocessing. A
    :class:`lesionbench.LesionbenchError` from ``load`` (a missing path…) stops the study before
    anything is written.
    """


@hookspec
def lesionbench_studies() -> Sequence[StudyPreset]:
    """Return study presets, each a :class:`lesionbench.StudyPreset` (name, description, TOML text).

    Presets are what ``lesionbench run NAME`` accepts besides a path to a study file; their TOML
    is validated when a study uses them.
    """


# --- reporters (issue #26): the leaderboard's output formats
@hookspec
def lesionbench_reporters() -> Sequence[Reporter]:
    """Return the leaderboard reporters this plugin contributes (``--format NAME``).

    Each is a :class:`lesionbench.reporters.Reporter`: a unique ``name`` (what ``lesionbench
    leaderboard --format`` takes), a ``description``, the main document's ``suffix`` (``".md"``) and
    ``render(board, single)``, which turns a :class:`lesionbench.board.Leaderboard` into documents
    (text by relative path, the main one under ``""``) without writing any file.
    """


# ---------------------------------------------------------------- executors and scores (issue #26)


@hookspec
def lesionbench_executors() -> Sequence[ExecutorPlugin]:
    """Return the executors this plugin contributes (``lesionbench run --executor NAME``).

    Each is a :class:`lesionbench.ExecutorPlugin`: a ``name``, a ``description``, the ``options``
    it accepts (name → one-line help; given as ``--executor-option KEY=VALUE`` or
    ``executor_options={...}``) and ``create(**options)`` returning an object with ``prepare(study,
    registry) -> Plan`` and ``session(plan, registry)``, a context manager yielding
    ``execute(store, tick, debug)``. Most executors build ``execute`` from
    :func:`lesionbench.executors.driver.drive`, which writes rows, resumes and ticks progress the
    same way for every executor; they supply only where a block is evaluated.
    """


@hookspec
def lesionbench_scores() -> Sequence[Score]:
    """Return the layer scores this plugin contributes (``--score NAME``; the default ``area``).

    Each is a :class:`lesionbench.Score`: a ``name``, a ``description`` and ``of(x, r)``, which maps
    positions ``x`` (float64 [levels], increasing, on the scoring axis: damage grows to the right)
    and retention curves ``r`` (float64 [levels, replicates], in [0, 1]) to one score per replicate
    (float64 [replicates]). The point estimate and every bootstrap replicate go through the same
    ``of``, so a score is written once.
    """
