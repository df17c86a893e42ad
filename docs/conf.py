"""Sphinx configuration of the lesionbench documentation (MyST Markdown, autodoc, sphinx-argparse).

Build: ``make docs`` (``python -m sphinx -E -W --keep-going -b html docs docs/_build/html``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import lesionbench  # noqa: E402  (the installed package: the docs describe what pip installs)

project = "lesionbench"
author = "the lesionbench authors"
copyright = "2026, the lesionbench authors"
release = version = lesionbench.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
    "lesionbench_docs",
]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "_ext"]
# the leaderboard (its Markdown, model pages and figures) copied in at build time; see _ext/lesionbench_docs.py
lesionbench_leaderboard = str(Path(__file__).parents[1] / "leaderboard")
html_theme = "alabaster"
html_title = f"lesionbench {release}"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
# Names inside docstrings that are not documented objects of their own (torch, pandas, private helpers).
nitpicky = False
suppress_warnings = ["myst.header"]
