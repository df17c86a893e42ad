"""lesionbench: how trained networks withstand damage to their own weights, layer by layer.

This module is the public surface: what a plugin or a notebook may import. Everything else in
the package may change between releases. Names load on first use, so that ``import lesionbench``
(and ``lesionbench --help``) does not import torch.

For plugin authors — implement hooks with :data:`hookimpl` and contribute:

* perturbations: subclasses of :class:`WeightPerturbation` (in-place damage to a layer's tensors)
  or :class:`HookPerturbation` (damage to what a layer computes), with a :class:`LevelAxis`;
  helpers :func:`count_for`, :func:`random_subset_mask`, :func:`positions_mask`, :func:`binomial_count`;
  each damages a :class:`Layer`; for transformers, :func:`attention_heads`, :func:`mlp_output`,
  :func:`transformer_blocks` find the parts and :func:`zero_features` / :func:`identity_hook`
  damage them (see :mod:`lesionbench.transformer_parts`);
* models: :class:`ModelSource` objects building a :class:`LoadedModel` from a :class:`ModelSpec`;
* datasets: :class:`DatasetSource` objects returning a :class:`RawDataset` (a text dataset's items are
  :class:`TextWindow` objects, tokenised by each language model's own preprocessing);
* study presets: :class:`StudyPreset`;
* executors: :class:`ExecutorPlugin` (see :mod:`lesionbench.executors.driver` for the shared loop);
* layer scores: objects following :class:`Score` (``name``, ``description``, ``of(x, r)``).

Helpers several built-in perturbations share (level grids, random masks, unit silencing, bit masks)
are in :mod:`lesionbench.damage`; the checks every contribution must pass, for a plugin's own tests,
in :mod:`lesionbench.testing`.

Raise :class:`LesionbenchError` for anything a user must fix (one line, exit code 2).

For scripts and notebooks: :func:`run`, :func:`lesioned`, :func:`load_results`,
:func:`load_outcomes` (results with per-image :class:`Outcomes`) and the score functions
:func:`layer_scores`, :func:`curves`, :func:`model_summary`, :func:`bootstrap` (intervals),
:func:`per_class_accuracy`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "hookimpl": "lesionbench.hookspecs",
    "LesionbenchError": "lesionbench.errors",
    "Perturbation": "lesionbench.perturbation",
    "WeightPerturbation": "lesionbench.perturbation",
    "HookPerturbation": "lesionbench.perturbation",
    "LevelAxis": "lesionbench.perturbation",
    "count_for": "lesionbench.perturbation",
    "random_subset_mask": "lesionbench.perturbation",
    "positions_mask": "lesionbench.perturbation",
    "binomial_count": "lesionbench.perturbation",
    "Layer": "lesionbench.layers",
    "attention_heads": "lesionbench.transformer_parts",
    "mlp_output": "lesionbench.transformer_parts",
    "transformer_blocks": "lesionbench.transformer_parts",
    "targets_holding": "lesionbench.transformer_parts",
    "display_names": "lesionbench.transformer_parts",
    "zero_features": "lesionbench.transformer_parts",
    "head_features": "lesionbench.transformer_parts",
    "identity_hook": "lesionbench.transformer_parts",
    "keeps_shape_hook": "lesionbench.transformer_parts",
    "ModelSource": "lesionbench.model_sources",
    "ModelSpec": "lesionbench.model_sources",
    "LoadedModel": "lesionbench.model_sources",
    "load_checkpoint_into": "lesionbench.model_sources",
    "DatasetSource": "lesionbench.data",
    "RawDataset": "lesionbench.data",
    "TextWindow": "lesionbench.data",
    "StudyPreset": "lesionbench.study",
    "Study": "lesionbench.study",
    "run": "lesionbench.api",
    "lesioned": "lesionbench.api",
    "load_results": "lesionbench.api",
    "load_outcomes": "lesionbench.api",
    "Outcomes": "lesionbench.store",
    "layer_scores": "lesionbench.scores",
    "curves": "lesionbench.scores",
    "model_summary": "lesionbench.scores",
    "bootstrap": "lesionbench.bootstrapping",
    "per_class_accuracy": "lesionbench.per_image",
    # executors and scores as plugin kinds (issue #26)
    "ExecutorPlugin": "lesionbench.executors",
    "Score": "lesionbench.layer_score",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lesionbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
