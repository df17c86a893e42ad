"""Re-initialisation (Zhang, Bengio & Singer 2019, "Are all layers created equal?").

Level α moves a layer back towards an initialisation: W ← α·W_init + (1 − α)·W_trained, for the
weight and the bias alike; α = 0 is the trained layer, α = 1 the initialisation itself.

- ``reinit`` uses the layer's *own* initial tensors (``layer.initial``: the model plugin's known
  init, or the study's ``init_checkpoint``), asking how far the layer travelled in training
  that matters.
- ``rerandomize`` uses a *fresh* initialisation drawn by the layer's own initialiser
  (``reset_parameters``, e.g. PyTorch's kaiming-uniform for Conv/Linear) on a CPU copy of the
  module, seeded from the cell's generator; the global RNG is left as it was. That is PyTorch's
  default for the layer type, which may differ from an architecture's own scheme (timm's ResNet
  re-initialises convs kaiming-normal, fan-out); use ``reinit`` for the true initial weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from lesionbench.damage import FRACTION_LEVELS as LEVELS
from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl
from lesionbench.layers import Layer
from lesionbench.perturbation import LevelAxis, WeightPerturbation


def interpolate_(layer: Layer, initial: Mapping[str, torch.Tensor], alpha: float) -> None:
    """weight, bias ← α·initial + (1 − α)·current, in place (exact at α = 0 and α = 1)."""
    for key in ("weight", "bias"):
        tensor = getattr(layer.module, key, None)
        if tensor is None:
            continue
        if key not in initial or tuple(initial[key].shape) != tuple(tensor.shape):
            raise LesionbenchError(
                f"the initial tensors of layer {layer.display!r} have no {key} of shape {tuple(tensor.shape)}"
            )
        start = initial[key].detach().to(device=tensor.device, dtype=tensor.dtype)
        tensor.mul_(1 - alpha).add_(start, alpha=alpha)


def fresh_init(layer: Layer, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A new draw of the layer's own initialiser, on a CPU float32 copy, seeded from ``generator``."""
    if not hasattr(layer.module, "reset_parameters"):
        raise LesionbenchError(
            f"layer {layer.display!r} ({type(layer.module).__name__}) has no reset_parameters to draw an initialisation from"
        )
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    fresh = copy.deepcopy(layer.module).to(device="cpu", dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # only the CPU generator is used, and it is put back
        torch.default_generator.manual_seed(seed)
        fresh.reset_parameters()
    return {k: v.detach() for k, v in fresh.state_dict().items()}


class Reinit(WeightPerturbation):
    def check_layer(self, layer: Layer) -> None:
        """Checked for every layer before a study starts."""
        if layer.initial is None:
            raise LesionbenchError(
                f"{self.name}: model layer {layer.display!r} does not know its initial weights; give the model an "
                "init_checkpoint (a state dict saved before training) or use rerandomize"
            )

    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        self.check_layer(layer)
        interpolate_(layer, layer.initial, level)


class Rerandomize(WeightPerturbation):
    def check_layer(self, layer: Layer) -> None:
        """Checked for every layer before a study starts: a layer with no initialiser of its own
        (transformers' ``Conv1D``) is refused in one line then, not by its first cell mid-run."""
        if not hasattr(layer.module, "reset_parameters"):
            raise LesionbenchError(
                f"{self.name}: layer {layer.display!r} ({type(layer.module).__name__}) has no reset_parameters to "
                "draw a fresh initialisation from; leave it out of the study's layers or use another perturbation"
            )

    def apply(self, layer: Layer, level: float, generator: torch.Generator) -> None:
        interpolate_(layer, fresh_init(layer, generator), level)


@hookimpl
def lesionbench_perturbations():
    common = dict(default_levels=LEVELS, level_range=(0.0, 1.0), axis=LevelAxis("α (share of the initialisation)"))
    return [
        Reinit(
            name="reinit",
            description="Move weights and biases to α·W_init + (1−α)·W_trained, W_init the layer's own initialisation.",
            **common,
        ),
        Rerandomize(
            name="rerandomize",
            description="Move weights and biases to α·W_fresh + (1−α)·W_trained, W_fresh a fresh draw of the layer's initialiser.",
            **common,
        ),
    ]
