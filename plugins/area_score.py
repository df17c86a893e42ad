"""The built-in layer score ``area``: the area under the retention curve over the level range,
divided by the range (the default score; see :class:`lesionbench.layer_score.AreaScore`)."""

from __future__ import annotations

from lesionbench.hookspecs import hookimpl
from lesionbench.layer_score import AreaScore


@hookimpl
def lesionbench_scores():
    return [AreaScore()]
