"""Third-party plugin packages laid out as pip installs them, for the tests that extend the harness.

A test writes a plugin's modules into a directory, with a ``*.dist-info`` naming its ``lesionbench``
entry points, and puts the directory on ``sys.path`` (or ``PYTHONPATH`` for a subprocess):
:mod:`importlib.metadata` then finds the entry points as it finds an installed distribution's.
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def install_plugin(
    root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str], version: str = "0.1"
) -> Path:
    """Write ``modules`` (import path with ``/`` between packages, no ``.py`` -> source, dedented) under
    ``root`` and ``DIST-VERSION.dist-info`` (the name normalised as pip does, ``-`` to ``_``) with its
    ``METADATA`` and an ``entry_points.txt`` whose ``[lesionbench]`` group holds ``entry_points``
    (name -> ``module`` or ``module:attr``). Installing again into the same ``root`` rewrites both.
    Returns ``root``, created where missing."""
    for name, source in modules.items():
        path = root / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[lesionbench]\n{lines}")
    return root
