"""The package list, found rather than written out: the repository's folders install under one name.

``pyproject.toml`` maps ``lesionbench`` -> ``benchmark/``, ``lesionbench.plugins`` -> ``plugins/`` and
``lesionbench.models`` -> ``models/``. setuptools' own ``packages.find`` cannot rename what it finds, and a
written-out list silently drops every sub-package nobody remembered to add (the 0.2.0 wheel shipped no
``lesionbench.cli`` and no ``lesionbench.executors``), so the sub-packages of each folder are found here.
"""

from setuptools import find_packages, setup

PACKAGE_DIR = {"lesionbench": "benchmark", "lesionbench.plugins": "plugins", "lesionbench.models": "models"}

setup(
    packages=[
        f"{name}.{sub}" if sub else name for name, folder in PACKAGE_DIR.items() for sub in ["", *find_packages(folder)]
    ],
    package_dir=PACKAGE_DIR,
)
