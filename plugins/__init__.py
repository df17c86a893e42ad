"""Built-in plugins: the paper's perturbations, the datasets and the study presets.

Each module is registered under the ``lesionbench`` entry-point group in pyproject.toml, exactly
as a third-party plugin would be.
"""
