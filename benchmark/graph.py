"""The model graph: one analysis of a network that every later step asks its questions of.

Two views of the same network, each built once per model (:class:`ModelGraph`):

* a **probe** (:mod:`lesionbench.probe`), one forward pass of a one-image input under a
  :class:`TorchFunctionMode` that sees every torch function the network calls, with which tensors:
  which Conv/Linear layers the pass uses and in what order (by the first read of their weight, so a
  layer used through a functional call — ``nn.MultiheadAttention.out_proj`` — counts, and
  declaration order does not), which per-channel affine norm each layer's output units feed (the
  units followed op by op: :mod:`lesionbench.unit_spans`), which layers are applied outside their
  module's call, which BatchNorms lie downstream of a layer, which other weights the pass reads, and
  the model's output;
* a **torch.fx trace** (:mod:`lesionbench.fx_cuts`), in which every in-place op that writes into a
  tensor read later is made an explicit dependency, so that the fast engine can cut the network at a
  layer (:func:`split_at`) and step from one cut to the next (:func:`transition`).

The names of those modules stay importable from here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from lesionbench.errors import LesionbenchError
from lesionbench.fx_cuts import Split, is_inplace, make_inplace_explicit, split_at, trace, transition
from lesionbench.layers import Layer, is_layer, kind_of, unit_axis_of
from lesionbench.probe import (
    Probe,
    check_module,
    lora_wrappers,
    module_tensors,
    packed_weight,
    probe,
    run_once,
    storages,
    unsupported_weight,
)
from lesionbench.unit_spans import UnitSpan, follow_units, norm_channel_axis

__all__ = [  # the analysis, and the names of its parts that were always imported from here
    "ModelGraph",
    "discover_layers",
    "Split",
    "is_inplace",
    "make_inplace_explicit",
    "split_at",
    "trace",
    "transition",
    "Probe",
    "check_module",
    "lora_wrappers",
    "module_tensors",
    "packed_weight",
    "probe",
    "run_once",
    "storages",
    "unsupported_weight",
    "UnitSpan",
    "follow_units",
    "norm_channel_axis",
]

log = logging.getLogger("lesionbench")


@dataclass
class ModelGraph:
    """One model analysed once: its layers in forward order, what they feed, and how to cut it.

    Build with :meth:`of`. ``layers`` are every Conv/Linear (not transposed) or transformers
    ``Conv1D`` module whose stored weight the forward pass reads, in the order of the first read (a
    LoRA-wrapped layer is one layer, its adapters folded in); ``left_out`` says, per module or
    weight path, why something the model holds or reads is not among them (parametrized or pruned
    weights, packed quantized modules, TorchScript submodules, LoRA adapter parts, weights no layer
    owns).
    """

    module: nn.Module
    example: torch.Tensor
    layers: list[Layer]
    output_shape: tuple[int, ...]  # of the class scores for the one-image example
    left_out: dict[str, str] = field(default_factory=dict)
    downstream_norms: dict[str, list[nn.Module]] = field(default_factory=dict)  # layer name -> norms
    _fx: tuple[fx.GraphModule | None, str] | None = None

    @classmethod
    def of(cls, module: nn.Module, example: torch.Tensor, aliases: Mapping[str, str] | None = None) -> ModelGraph:
        """Analyse ``module`` on ``example`` (a one-image batch in the model's dtype and device)."""
        aliases = dict(aliases or {})
        names = {m: n for n, m in module.named_modules(remove_duplicate=False)}
        seen = probe(module, example)
        wrappers = {}  # only adapters the forward pass applies (not a disabled, merged or inactive one)
        for base, (wrapper, adapters) in lora_wrappers(module).items():
            used = tuple((a, b, scale) for a, b, scale in adapters if a in seen.order and b in seen.order)
            if used:
                wrappers[base] = (wrapper, used)
        left_out = {}
        for base, (_wrapper, adapters) in wrappers.items():
            for part in (m for a, b, _s in adapters for m in (a, b)):
                left_out[names[part]] = (
                    f"part of the LoRA adapter of {names[base]}, studied as one layer with it "
                    "(effective weight base + s·B·A)"
                )
        for name, m in module.named_modules():
            if is_layer(m) and m not in seen.order and name not in left_out:
                left_out[name] = unsupported_weight(m) or "the forward pass never reads its weight"
            elif packed_weight(m):
                left_out[name] = packed_weight(m)
            elif isinstance(m, torch.jit.ScriptModule) and not any(name.startswith(f"{k}.") for k in left_out):
                left_out[name] = (
                    "a TorchScript submodule: its compiled code's weight reads cannot be watched, so "
                    "the layers inside it are not studied (give its nn.Module instead)"
                )
        for name, op in seen.other_weights.items():
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            left_out.setdefault(
                name,
                f"a weight of {type(owner).__name__} that {op!r} reads, not a Conv/Linear/Conv1D "
                "layer's: no perturbation reaches it",
            )
        order = [m for m in seen.order if names[m] not in left_out]
        n = len(order)
        layers = []
        for i, m in enumerate(order):
            name = names[m]
            wrapper, adapters = wrappers.get(m, (None, ()))
            fed = seen.feeds.get(m, ())
            norms = tuple(norm for norm, _span in fed)
            layers.append(
                Layer(
                    name=name,
                    display=aliases.get(name, name),
                    index=i,
                    relative_depth=i / (n - 1) if n > 1 else 0.0,
                    kind=kind_of(m),
                    module=m,
                    unit_axis=unit_axis_of(m),
                    norms=norms,
                    norm_names=tuple(names[x] for x in norms),
                    norm_spans=tuple((span.shift, span.lo, span.hi) for _norm, span in fed),
                    norm_widths=tuple(span.width for _norm, span in fed),
                    applied_by=seen.functional.get(m, ""),
                    wrapper=wrapper,
                    adapters=adapters,
                    adapter_names=tuple(names[x] for a, b, _s in adapters for x in (a, b)),
                )
            )
        downstream = {names[m]: list(v) for m, v in seen.downstream_norms.items()}
        return cls(module, example, layers, tuple(seen.output.shape), left_out, downstream)

    @property
    def num_classes(self) -> int:
        """Class count, from the model's output (not from the last layer declared)."""
        if len(self.output_shape) != 2:
            raise LesionbenchError(
                f"the model's class scores have shape {self.output_shape} for one image; lesionbench needs "
                "[images, classes]"
            )
        return self.output_shape[-1]

    @property
    def fx(self) -> fx.GraphModule | None:
        """The traced graph (traced on first use), or None when the model cannot be traced safely."""
        if self._fx is None:
            device = next((p.device for p in self.module.parameters()), self.example.device)
            self._fx = trace(self.module, self.example.to(device))
        return self._fx[0]

    @property
    def untraceable(self) -> str:
        """Why there is no fx graph ("" when there is one)."""
        self.fx  # noqa: B018 - the property traces on first access, filling _fx
        return self._fx[1]

    def norms_reached(self, layer: Layer) -> list[nn.Module]:
        """The BatchNorms whose input depends on ``layer``: what a recalibration must re-estimate."""
        return list(self.downstream_norms.get(layer.name, []))

    def split(self, layer: Layer) -> Split | None:
        """The cut at ``layer`` (None when the fast engine cannot cache upstream of it)."""
        if self.fx is None:
            return None
        return split_at(self.fx, layer.name, [t for m in layer.modules() for t in module_tensors(m)])


def discover_layers(module: nn.Module, example: torch.Tensor, aliases: Mapping[str, str] | None = None) -> list[Layer]:
    """The Conv/Linear layers of ``module`` in forward order (see :meth:`ModelGraph.of`)."""
    return ModelGraph.of(module, example, aliases).layers
