"""The correctness cases of a test module as a model plugin (``PREFIX:NAME``), for conftest's ``registry``.

:class:`CaseSource` builds a case class of the module with torch's seed 0, in eval mode, for grey
28×28 images (the Fashion models' preprocessing); a module sets ``PLUGINS = case_plugins(source)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel
from lesionbench.models.fashion import grey_28_preprocess


class CaseSource:
    """A model source over ``archs`` (case name -> class or factory of an ``nn.Module``): ``PREFIX:NAME``
    builds ``archs[NAME](**options)``, the options left once :meth:`own_options` took the source's own;
    it claims no bare name. ``loaded``: further fields of the :class:`LoadedModel`."""

    def __init__(self, name: str, description: str, archs: dict, preprocess_key: str, **loaded):
        self.name, self.description = name, description
        self.archs, self.preprocess_key, self.loaded = archs, preprocess_key, loaded

    def claims(self, arch):
        return False

    def examples(self):
        return sorted(self.archs)

    def own_options(self, options: dict) -> Callable[[nn.Module], nn.Module]:
        """Pop this source's own options from ``options``; what they do to the built module (nothing here)."""
        return lambda module: module

    def build(self, spec):
        opts = dict(spec.options)
        finish = self.own_options(opts)
        torch.manual_seed(0)
        module = finish(self.archs[spec.arch](**opts).eval())
        return LoadedModel(
            name=spec.ref,
            module=module,
            input_size=(1, 28, 28),
            preprocess=grey_28_preprocess(),  # grey, 28×28, Fashion-MNIST's mean and std
            preprocess_key=self.preprocess_key,
            **self.loaded,
        )


class _Plugin:
    def __init__(self, source: CaseSource):
        self._source = source

    @hookimpl
    def lesionbench_models(self):
        return [self._source]


def case_plugins(source: CaseSource) -> list[tuple[str, object]]:
    """A test module's ``PLUGINS``: ``source`` as the plugin of its name, beside the built-ins."""
    return [(source.name, _Plugin(source))]
