"""lesionbench: how trained networks withstand damage to their own weights, layer by layer."""

__version__ = "0.1.0"
