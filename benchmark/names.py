"""The one rule that names what a study perturbs — layers and the blocks, stages, attention modules
and MLPs perturbations target alike — in results, run.log, the leaderboard, plots and ``compare``.

A module at path P of the studied model is named, in this order:

1. the model's alias for P (:attr:`lesionbench.model_sources.LoadedModel.aliases`: ``conv1`` for
   AlexNet's ``features.0``; transformers' own path ``model.layers.3`` for the wrapped
   ``lm.model.layers.3`` of an ``hf:`` model, whose source aliases every module);
2. for a container without an alias, the name the aliases of the layers inside it give it (when
   ``a.b.c`` is named ``x.c``, ``a.b`` is named ``x``: :func:`lesionbench.transformer_parts.display_names`);
3. its path.

The name is also the ``layer`` key of a results row. Until this rule, targets were named by
(2)–(3) only, so an ``hf:`` model's blocks that held no studied layer were stored under the wrapper's
path (``lm.model.layers.1`` beside ``model.layers.0``, in ``leaderboard/results/llm-track``). Such
files still read, resume and score: :func:`legacy_layer_names` maps those keys, for the models of a
source that declares the prefix its wrapper adds (``ModelSource.wrapper_prefix``: ``"lm."`` for
``hf``), to the name the rule gives, wherever rows or per-image outcomes are read. The files are
never rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # reading results (legacy_layer_names) does not import torch
    from lesionbench.layers import Layer


def named(targets: Sequence[Layer], layers: Sequence[Layer], aliases: Mapping[str, str]) -> list[Layer]:
    """``targets`` (a perturbation's own layer axis) with the display name the rule gives each path;
    ``layers`` are the model's studied layers (already named by the rule), ``aliases`` the model's."""
    from lesionbench.transformer_parts import display_names

    names = {**display_names(layers), **aliases}
    return [
        t if names.get(t.name, t.name) == t.display else replace(t, display=names.get(t.name, t.name)) for t in targets
    ]


def wrapper_prefixes(models: Sequence[str]) -> dict[str, str]:
    """model name (a results row's ``model``, the study's reference) → the prefix its source's wrapper
    adds to module paths (``ModelSource.wrapper_prefix``), for the models whose source declares one.
    A model no installed source builds (a Python module given to ``lesionbench.run``) has none."""
    try:
        from lesionbench.model_sources import ModelSpec, resolve_source
        from lesionbench.registry import get_registry

        sources = {k: c.obj for k, c in get_registry().contributions("models").items()}
    except Exception:  # noqa: BLE001 - a broken plugin must not stop a file from being read
        return {}
    out = {}
    for model in set(models):
        try:
            prefix = getattr(sources[resolve_source(ModelSpec(model), sources)], "wrapper_prefix", "")
        except Exception:  # noqa: BLE001 - an unknown model: named as stored
            continue
        if isinstance(prefix, str) and prefix:
            out[model] = prefix
    return out


def legacy_layer_names(models: Sequence[str], layers: Sequence[str]) -> np.ndarray:
    """The ``layer`` keys ``layers`` of rows of ``models`` (equal lengths) under the naming rule:
    a key stored under its model's wrapper prefix (``lm.model.layers.1`` of an ``hf:`` model, from
    before the rule) loses it; every other key is returned as it is. Returns object [len(layers)]."""
    layers = np.asarray(layers, dtype=object)
    models = np.asarray(models, dtype=object)
    if not len(layers):
        return layers
    prefixes = wrapper_prefixes([m for m, l in zip(models, layers) if isinstance(l, str) and l])
    if not prefixes:
        return layers
    out = layers.copy()
    for i, (model, layer) in enumerate(zip(models, layers)):
        prefix = prefixes.get(model)
        if prefix and isinstance(layer, str) and layer.startswith(prefix):
            out[i] = layer[len(prefix) :]
    return out
