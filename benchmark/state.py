"""A model's state held still while lesionbench evaluates it: quantization observers switched off.

A model prepared for quantization-aware training (``torch.ao.quantization.prepare_qat``) or for
calibration (``prepare``) carries *observers*: modules that record the range of what passes
through them and, in a fake-quant module, re-derive its scale and zero point from it — at every
forward call, in eval mode too (``FakeQuantize.forward`` checks its ``observer_enabled`` buffer,
not ``training``). Left on, every evaluation pass would move them: two clean passes would differ,
a cell's result would depend on the cells evaluated before it, and the model would not come back
as it was. :func:`frozen_observers` switches them off for as long as lesionbench holds the model
(PyTorch's own switch, ``disable_observer``, for fake-quant modules; an identity forward for a
bare observer, whose output is its input anyway) and, on exit, puts every buffer and flag of
theirs back bit for bit. Fake quantization itself stays on: it is part of what the model computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _observer_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    try:
        from torch.ao.quantization.fake_quantize import FakeQuantizeBase
        from torch.ao.quantization.observer import ObserverBase
    except ImportError:  # a torch without torch.ao.quantization: nothing to freeze
        return (), ()
    return (FakeQuantizeBase,), (ObserverBase,)


def observers(module: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The fake-quant modules and the bare observers (not inside a fake-quant module) of ``module``."""
    fake_types, observer_types = _observer_types()
    if not fake_types:
        return [], []
    fakes = [m for m in module.modules() if isinstance(m, fake_types)]
    inside = {id(sub) for f in fakes for sub in f.modules()}
    bare = [m for m in module.modules() if isinstance(m, observer_types) and id(m) not in inside]
    return fakes, bare


def _identity(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x


@contextmanager
def frozen_observers(module: nn.Module) -> Iterator[int]:
    """Switch ``module``'s quantization observers off for the block; yields how many there are.

    On exit every observer's and fake-quant module's parameters, buffers (``observer_enabled``,
    ``min_val``, ``scale``…) and training flag are restored bit for bit, however the block ends.
    Re-entrant: an inner block finds the observers already off and puts back what it found.
    """
    fakes, bare = observers(module)
    if not fakes and not bare:
        yield 0
        return
    owners = list(dict.fromkeys(m for f in [*fakes, *bare] for m in f.modules()))
    saved = [
        (
            m,
            m.training,
            {k: t.detach().clone() for k, t in [*m._parameters.items(), *m._buffers.items()] if t is not None},
        )
        for m in owners
    ]
    overridden = [m for m in bare if "forward" not in m.__dict__]
    try:
        for fake in fakes:
            fake.disable_observer()
        for m in overridden:
            m.forward = _identity  # an instance attribute: nn.Module.__call__ calls it instead
        yield len(fakes) + len(bare)
    finally:
        for m in overridden:
            del m.forward
        with torch.no_grad():
            for m, training, tensors in saved:
                m.train(training)
                for key, value in tensors.items():
                    current = m._parameters.get(key) if key in m._parameters else m._buffers.get(key)
                    if current is not None and current.shape == value.shape:
                        current.copy_(value)
                    else:
                        (m._parameters if key in m._parameters else m._buffers)[key] = value
