"""Which targets a perturbation can damage, decided before anything runs.

A study names layers and perturbations; some pairs cannot work for what the model computes: a hook
perturbation cannot see the output of a layer whose weight another op applies, and a perturbation may
refuse a target by what flows through it (block removal of a block that changes its input's shape,
a bit flip of an output whose bits it cannot flip). Both are checked here, at plan time, so a refusal
is one line and nothing is written (:func:`lesionbench.plan.prepare` calls them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lesionbench.errors import LesionbenchError, blame
from lesionbench.graph import run_once
from lesionbench.hook_routing import HOOKED_OPS, ROUTED_OPS
from lesionbench.layers import Layer
from lesionbench.perturbation import Perturbation

if TYPE_CHECKING:
    from lesionbench.plan import PreparedModel


def hookable(layers: list[Layer], perturbation: str, ref: str, named: bool, notes: list[str]) -> list[Layer]:
    """The layers a hook perturbation can damage: those whose output passes through their module's
    call, where its forward hook sees it, and those applied by a ``linear``/``convNd`` op outside it
    (a ``.forward()`` call, ``F.linear`` on its weight: the harness runs the hooks on that op's
    output), and ``nn.MultiheadAttention``'s out_proj (applied inside ``multi_head_attention_forward``:
    the harness calls the module there, see ``perturbation.OutProjectionCalled``). A layer whose
    weight another op applies is refused when the study names it, else left out of this
    perturbation and named in run.log."""
    hookable_ops = HOOKED_OPS | ROUTED_OPS
    for layer in layers:
        if layer.applied_by and layer.applied_by not in hookable_ops:
            why = (
                f"layer {layer.display!r} of model {ref!r}: its weight is applied by {layer.applied_by!r} outside "
                f"the module's own call, so a forward hook never sees its output and {perturbation!r} cannot damage it"
            )
            if named:
                raise LesionbenchError(f"{why}; weight perturbations can, or leave the layer out of the study")
            notes.append(f"{why}: left out of {perturbation}")
    return [layer for layer in layers if not layer.applied_by or layer.applied_by in hookable_ops]


def check_by_forward(prepared: PreparedModel, name: str, perturbation: Perturbation, plugin: str) -> None:
    """Refuse, before anything runs, a target the perturbation cannot damage for what it computes:
    its :meth:`~lesionbench.perturbation.Perturbation.check_hooks` on every target of the model, one
    example (zeros, as the model's first check) through the clean model, the hooks removed however
    it ends. Nothing to do (no forward pass) when the perturbation declares no check hooks.

    Raises:
        LesionbenchError: one line naming the perturbation, the model and what a hook refused.
    """
    handles = []
    loaded = prepared.loaded
    try:
        with blame(plugin, f"checking what {name!r} perturbs in {loaded.name!r} on one input"):
            for layer in prepared.targets_of(name):
                handles.extend(perturbation.check_hooks(layer) or [])
            if handles:
                run_once(loaded.module, torch.zeros(1, *loaded.input_size, dtype=prepared.dtype))
    except LesionbenchError as exc:
        raise LesionbenchError(f"perturbation {name!r} cannot damage model {loaded.name!r}: {exc}") from None
    finally:
        for handle in handles:
            handle.remove()
