"""The hooks a lesionbench plugin may implement.

Every built-in model, perturbation, dataset and study preset is contributed through these
hooks, from modules registered under the ``lesionbench`` entry-point group — the same door a
third-party package uses. A plugin is a plain module with ``@hookimpl`` functions::

    from benchmark.hookspecs import hookimpl

    @hookimpl
    def lesionbench_perturbations():
        return [MyPerturbation()]
"""

from __future__ import annotations

import pluggy

PROJECT = "lesionbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lesionbench_perturbations() -> list:
    """Return perturbations, each an object satisfying :class:`benchmark.perturbation.Perturbation`.

    Names must be unique across all loaded plugins; a clash is reported naming both plugins.
    """


@hookspec
def lesionbench_models() -> list:
    """Return model sources, each a :class:`benchmark.models.ModelSource`.

    A source owns a prefix (``timm`` in ``timm:resnet18``) and may also claim bare names
    (``fashion_alexnet``); it builds an ``nn.Module`` plus the preprocessing its weights expect.
    """


@hookspec
def lesionbench_datasets() -> list:
    """Return dataset sources, each a :class:`benchmark.data.DatasetSource`.

    A source turns a path into labelled raw images; the harness picks the evaluation subset and
    applies each model's own preprocessing.
    """


@hookspec
def lesionbench_studies() -> list:
    """Return study presets, each a :class:`benchmark.study.StudyPreset` (name, description, TOML).

    Presets are what ``lesionbench run NAME`` accepts besides a path to a study file.
    """
