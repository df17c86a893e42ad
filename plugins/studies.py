"""The built-in study presets, one TOML file each in ``plugins/presets/``."""

from __future__ import annotations

from pathlib import Path

import tomllib

from lesionbench.hookspecs import hookimpl
from lesionbench.study import StudyPreset

PRESETS = Path(__file__).parent / "presets"


@hookimpl
def lesionbench_studies():
    out = []
    for path in sorted(PRESETS.glob("*.toml")):
        text = path.read_text()
        out.append(StudyPreset(path.stem, tomllib.loads(text).get("description", ""), text))
    return out
