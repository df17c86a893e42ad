"""The six definitional invariants of issue #23, checked on one generated model through lesionbench's public API.

Each oracle is computed from the model itself (``torch.func.functional_call``, forward hooks,
tensor bytes) and from what :mod:`property_models` knows by construction, never from
lesionbench's own analysis:

a. the fast engine's results equal the naive engine's, cell for cell;
b. synapse knockout at p = 1 equals the network evaluated with the layer's effective weight and
   bias replaced by zeros (``functional_call``); the clean row equals the network itself;
c. node knockout at p = 1 equals that network with, in addition, the layer's output and every
   per-channel norm output its units feed zeroed on those channels (forward hooks);
d. every hook perturbation at its strongest level changes the loss wherever (b)'s oracle does;
e. before every cell (all but that cell's own layer, which the harness may already have prepared)
   and after the run (everything), every parameter, buffer and module ``training`` flag of the
   user's model (fake-quant observer state included) is bit-identical to before the run;
f. every floating-point weight (Parameter of 2+ dims) the forward pass reads — found by changing it
   and watching the output — is a studied layer, or is named in ``run.log`` (with its reason);
g. the perturbations of parts, each equal to its documented definition built independently
   (:mod:`property_transformers` records the parts by construction): ``head_knockout`` of k heads
   equals the network with those heads' slices of the output projection's input zeroed (their
   columns of its weight zero) for some k heads; ``mlp_neuron_knockout`` likewise for the MLP output
   projection's input features; ``block_drop`` equals the network with the block replaced by the
   identity (a block that changes its input's shape is refused in its cell), on the blocks of the
   longest list of identical attention-holding blocks; ``block_removal`` of k of a stage's
   identity-shortcut blocks equals the stage with some k of them replaced by the identity;
   ``reinit`` at α equals the network with the layer's weight and bias set to α·initial + (1 − α)·trained
   (the initial tensors those of the same architecture built from another seed, given to the run
   as its ``init_checkpoint``).

:func:`check` returns the number of cells run and a list of failures ("(x) ..."), so the suite can
assert that it is empty and the long mode can count them.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lesionbench
from lesionbench import LesionbenchError, hookimpl
from lesionbench.registry import create_registry
from lesionbench.store import NONFINITE
from property_models import Expect, Spec, build, logits, reference_copy
from property_transformers import GPT2StyleBlock, Parts

SKIPPED: dict[str, str] = {}  # every built-in perturbation is checked
# Perturbations whose targets are parts (attention modules, MLPs, blocks, stages), not layers: (g).
PART_PERTURBATIONS = ("head_knockout", "mlp_neuron_knockout", "block_drop", "block_removal")
ABSENT = "finds nothing to perturb"  # in ``refused``: the model has none of the parts it acts on
# Levels checked besides the strongest: one or half of the units, so that (g) sees which ones were hit.
EXTRA_LEVELS = {"head_knockout": [0.5], "mlp_neuron_knockout": [0.125], "block_removal": [0.5], "reinit": [0.5]}
HOOKS = ("activation_knockout", "activation_noise", "activation_bit_flip", "activation_bit_flip_single")
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
KEY = ["layer", "perturbation", "level", "draw"]


def builtin_perturbations() -> dict:
    """The built-in perturbations (no third-party plugin), less the :data:`SKIPPED` ones."""
    found = create_registry(entry_points=False).contributions("perturbations")
    return {n: c.obj for n, c in found.items() if n not in SKIPPED}


def strongest(p) -> float:
    """The level of most damage: the top of the range, or the fewest bits for quantisation."""
    lo, hi = p.level_range
    return lo if p.identity_level is None else hi


def levels_for(p, long: bool) -> list[float]:
    lo, hi = p.level_range
    return sorted({strongest(p), *EXTRA_LEVELS.get(p.name, [])} | ({float(round((lo + hi) / 2))} if long else set()))


# ------------------------------------------------------------------------------------ (e) state


# Switches a run may turn for its duration (it evaluates in eval mode with fake-quant observers
# frozen), compared only once the run is over; everything else is compared before every cell.
MODES = (".observer_enabled",)


def state_of(model: nn.Module) -> dict:
    """Every parameter and buffer (as dtype, shape and raw bytes) and every module's training flag."""
    out = tensors_of(model, modes=True)
    for name, m in model.named_modules(remove_duplicate=False):
        out[f"<training {name or 'model'}>"] = m.training
    return out


def tensors_of(model: nn.Module, modes: bool = False) -> dict:
    """Every parameter and buffer (observer state included) as dtype, shape and raw bytes; the
    :data:`MODES` switches only with ``modes``."""
    out: dict = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        if not modes and name.endswith(MODES):
            continue
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        out[name] = (t.dtype, tuple(t.shape), bytes(raw.numpy()))
    return out


def differences(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


class _Checked:
    """A plugin giving the built-in perturbations under their own names, each of which first checks
    (at the start of every cell, when the previous cell has been undone) that the model is as given:
    every tensor but the cell's own layer's, which the harness may have prepared already."""

    def __init__(self, model: nn.Module, perturbations: dict, failures: list[str], refused: dict) -> None:
        self.model, self.failures, self.reference = model, failures, tensors_of(model)
        self.refused = refused  # perturbation -> the one line with which it refused a layer before the run
        self.items = [self._wrap(p) for p in perturbations.values()]

    def _wrap(self, p):
        q = copy.copy(p)
        method = "hooks" if p.kind == "hooks" else "apply"
        inner = getattr(p, method)

        def checked(layer, level, generator):
            # The cell's own layer (its adapters, its norms) may already be prepared for the damage (a LoRA
            # adapter folded into the weight): those tensors are checked before other layers' cells and at the end.
            own, now = set(layer.named_tensors()), tensors_of(self.model)
            changed = [k for k in differences(self.reference, now) if k not in own]
            if changed:
                self.failures.append(f"(e) before the cell {layer.name}/{p.name}/{level}: changed {changed[:4]}")
                self.reference.update({k: now.get(k) for k in changed})  # report each change once
            return inner(layer, level, generator)

        def check_layer(layer):
            try:
                return p.check_layer(layer)
            except LesionbenchError as exc:
                self.refused[p.name] = str(exc)
                raise

        object.__setattr__(q, method, checked)
        object.__setattr__(q, "check_layer", check_layer)
        return q

    @hookimpl
    def lesionbench_perturbations(self):
        return self.items


# ------------------------------------------------------------------------------------ (b) (c) (f) oracles


def oracle_loss(twin: nn.Module, images, labels, zero=(), site=None, norms=()) -> float:
    """Mean cross-entropy of ``twin`` with the Parameters ``zero`` replaced by zeros and, for each
    (norm path, axis, channels) in ``norms`` and for ``site``, those output channels zeroed."""
    handles = []

    def zero_channels(axis, channels):
        index = torch.tensor(channels, dtype=torch.long)
        return lambda _m, _i, out: out.index_fill(axis, index, 0)

    if site is not None:
        handles.append(twin.get_submodule(site).register_forward_hook(lambda _m, _i, out: torch.zeros_like(out)))
    for path, axis, channels in norms:
        handles.append(twin.get_submodule(path).register_forward_hook(zero_channels(axis, channels)))
    params = dict(twin.named_parameters(remove_duplicate=False))
    values = {name: torch.zeros_like(params[name]) for name in zero}
    try:
        with torch.no_grad():
            out = logits(functional_call(twin, values, (images,), tie_weights=False))
    finally:
        for h in handles:
            h.remove()
    return float(F.cross_entropy(out.float(), labels))


def weights_read(twin: nn.Module, images) -> list[str]:
    """The floating-point Parameters of 2+ dims whose value the output depends on (each changed alone)."""
    with torch.no_grad():
        clean = logits(twin(images))
        read = []
        for name, p in twin.named_parameters(remove_duplicate=False):
            if p.is_floating_point() and p.dim() >= 2:
                changed = logits(functional_call(twin, {name: p + 1}, (images,), tie_weights=False))
                if not torch.equal(changed, clean):
                    read.append(name)
    return read


def mentioned(log: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", log) is not None


def _owners(param: str) -> list[str]:
    """The module paths that may stand for a Parameter: its owner and ancestors below the block."""
    parts = param.split(".")
    return [".".join(parts[:k]) for k in range(len(parts), 1, -1) if not (k == 2 and parts[0] == "blocks")]


# ------------------------------------------------------------------------------------ the check


def _run(
    model, images, labels, perturbations, levels, engine, failures, refused, out=None, initial=None
) -> pd.DataFrame:
    """One study of every layer; a perturbation that refuses a layer (one line, before the run) is
    recorded in ``refused`` and the study runs again without it."""
    for attempt in itertools.count():
        registry = create_registry(entry_points=False, builtins=False)
        registry.register(_Checked(model, perturbations, failures, refused), "checked-builtins")
        registry.register(importlib.import_module("lesionbench.executors.local"), "local")  # executors are plugins
        wanted = [n for n in perturbations if n not in refused]
        study = {
            "perturbations": wanted,
            "levels": {n: levels[n] for n in wanted},
            "draws": 1,
            "device": "cpu",
            "engine": engine,
            "seed": 0,
            "models": [{"ref": "model", "init_checkpoint": str(initial)}],
        }
        known = len(refused)
        try:
            where = None if out is None else out if attempt == 0 else out.with_name(f"{out.name}-{attempt}")
            return lesionbench.run(study, where, model=model, data=(images, labels), registry=registry)
        except LesionbenchError as exc:
            absent = re.match(r"perturbation '(\w+)' finds nothing to perturb", str(exc))
            if absent:  # a perturbation of parts the model does not have: not a refusal, nothing to check
                refused[absent.group(1)] = ABSENT
            elif "does not keep its input's shape, so it cannot be removed" in str(exc):  # at its first pass
                refused["block_drop"] = str(exc)
            elif len(refused) == known:
                raise


def _close(a: float, b: float, tol: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def check(spec: Spec, long: bool = False, only: Sequence[str] = ()) -> tuple[int, list[str], dict[str, str]]:
    """Build ``spec``'s model, run every layer × built-in perturbation (or those named in ``only``:
    then (f)'s completeness is not checked) with both engines, check a–g.

    Returns the number of cells run, the failures, and the perturbations that refused a layer of
    this model before the run (name → their one line; those are left out of the checks)."""
    model, images, labels, expects, parts = build(spec)
    initial = build(replace(spec, seed=spec.seed + 1))[0].state_dict()  # the same architecture, other weights
    perturbations = {n: p for n, p in builtin_perturbations().items() if not only or n in only}
    levels = {n: levels_for(p, long) for n, p in perturbations.items()}
    before, twin, failures, refused = state_of(model), reference_copy(model), [], {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(initial, Path(tmp) / "init.pt")
        args = (model, images, labels, perturbations, levels)
        naive = _run(*args, "naive", failures, refused, Path(tmp) / "run", Path(tmp) / "init.pt")
        logs = sorted(Path(tmp).glob("run*/run.log"), key=lambda f: f.stat().st_mtime)  # the run that finished
        log = logs[-1].read_text() if logs else ""
        fast = _run(*args, "fast", failures, refused, None, Path(tmp) / "init.pt")
    if differences(before, state_of(model)):
        failures.append(f"(e) after the runs: changed {differences(before, state_of(model))[:4]}")
    tol = TOLERANCE[spec.dtype]

    a, b = naive.set_index(KEY), fast.set_index(KEY)
    for key in a.index.union(b.index):  # (a)
        if key not in a.index or key not in b.index:
            failures.append(f"(a) cell {key} in one engine only")
        elif not (_close(a.loc[key, "loss"], b.loc[key, "loss"], 1e-6) and a.loc[key, "top1"] == b.loc[key, "top1"]):
            failures.append(f"(a) {key}: naive loss {a.loc[key, 'loss']:.6f}, fast {b.loc[key, 'loss']:.6f}")

    unremovable = _unremovable(twin, images, parts)
    for frame, engine in ((naive, "naive"), (fast, "fast")):  # a cell that failed is a failure of the harness
        error = frame.error.fillna("").astype(str)
        refused_in_cell = (
            frame.layer.isin(unremovable)
            & frame.perturbation.eq("block_drop")
            & error.str.contains("cannot be removed")
        )
        broken = frame[error.str.len().gt(0) & frame.error.ne(NONFINITE) & ~refused_in_cell]
        failures += [
            f"(a) {engine} cell {r.layer}/{r.perturbation}/{r.level} failed: {r.error}" for r in broken.itertuples()
        ]
    clean = float(naive.loc[naive.perturbation == "clean", "loss"].iloc[0])
    clean_oracle = oracle_loss(twin, images, labels)
    if not _close(clean, clean_oracle, tol):
        failures.append(f"(b) clean row loss {clean:.6f}, the network itself {clean_oracle:.6f}")
    studied = set(naive.layer[~naive.perturbation.isin(PART_PERTURBATIONS)]) - {""}  # layers, not parts
    for e in expects:
        name = next((n for n in e.names if n in studied), None)
        if name is None:
            continue  # not studied: (f) below says whether run.log tells why
        rows = naive[naive.layer == name].set_index(["perturbation", "level"])["loss"]
        zeroed = oracle_loss(twin, images, labels, e.zero)
        got = rows.get(("synapse_knockout", 1.0), math.nan)
        if "synapse_knockout" in levels and "synapse_knockout" not in refused and not _close(got, zeroed, tol):  # (b)
            failures.append(f"(b) {name}: synapse_knockout p=1 loss {got:.6f}, weight zeroed {zeroed:.6f}")
        silenced = oracle_loss(twin, images, labels, e.zero, e.site, e.norms)
        got = rows.get(("node_knockout", 1.0), math.nan)
        if "node_knockout" in levels and "node_knockout" not in refused and not _close(got, silenced, tol):  # (c)
            failures.append(f"(c) {name}: node_knockout p=1 loss {got:.6f}, units silenced {silenced:.6f}")
        if "reinit" in levels and "reinit" not in refused:  # (g) reinit
            failures += _reinit_failures(twin, images, labels, e, name, initial, rows, levels["reinit"], tol)
        if not _close(zeroed, clean_oracle, tol):  # (d)
            for h in (h for h in HOOKS if h in perturbations and h not in refused):
                got = rows.get((h, strongest(perturbations[h])))
                if got is None and not any(mentioned(line, name) and mentioned(line, h) for line in log.splitlines()):
                    failures.append(f"(d) {name}: no {h} cell, and run.log does not say why")
                elif got == clean:
                    failures.append(f"(d) {name}: {h} at its strongest leaves the loss at the clean {clean:.6f}")

    failures += _part_failures(naive, twin, images, labels, parts, levels, refused, unremovable, tol)
    declared = {n for e in expects for n in e.names}
    for name in sorted(studied - declared):  # (f) discovery is exact: nothing studied that is not a layer
        failures.append(f"(f) {name} is studied as a layer of its own")
    for param in (
        weights_read(twin, images) if not only else ()
    ):  # (f) complete: every weight read is a layer or explained
        if not any(o in studied or mentioned(log, o) for o in _owners(param)):
            failures.append(f"(f) {param} is read by the forward pass but is no layer and run.log says nothing")
    drift = list(dict.fromkeys(f for f in failures if f.startswith("(e) before")))
    if len(drift) > 1:  # the first cell that found the model changed, and how many more did
        failures = [f for f in dict.fromkeys(failures) if f not in drift[1:]]
        failures.append(f"(e) ... and before {len(drift) - 1} more cells")
    return len(naive) + len(fast), failures, refused


# ------------------------------------------------------------------------------------ (g) parts


def _loss_of(model: nn.Module, images, labels, values=None) -> float:
    with torch.no_grad():
        out = logits(functional_call(model, values or {}, (images,), tie_weights=False))
    return float(F.cross_entropy(out.float(), labels))


def _some_k(level: float, n: int) -> list[tuple[int, ...]]:
    """Every choice of floor(level·n) of n units (the perturbations' count, computed here afresh)."""
    return list(itertools.combinations(range(n), int(math.floor(level * n + 1e-9))))


def _columns_zeroed(twin, images, labels, weight: str, axis: int, features) -> float:
    w = dict(twin.named_parameters())[weight].detach()
    index = torch.tensor(sorted(features), dtype=torch.long)
    return _loss_of(twin, images, labels, {weight: w.index_fill(axis, index, 0) if len(index) else w})


class _Skip(nn.Module):
    """The identity in a block's place: its input hidden states (a tuple when the block returns one)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) if self.as_tuple else x


def _without(twin: nn.Module, paths, images, labels) -> float:
    """The loss of ``twin`` with the modules ``paths`` replaced by the identity."""
    copy_ = copy.deepcopy(twin)
    for path in paths:
        parent, _, child = path.rpartition(".")
        owner = copy_.get_submodule(parent)
        owner._modules[child] = _Skip(isinstance(owner._modules[child], GPT2StyleBlock))
    return _loss_of(copy_, images, labels)


def _dropped_blocks(parts: Parts) -> list[str]:
    """The blocks block_drop acts on, by its definition: the longest list (the last of equals)."""
    longest = max((len(children) for _path, children in parts.block_lists), default=0)
    return [children for _path, children in parts.block_lists if len(children) == longest][-1] if longest else []


def _unremovable(twin, images, parts: Parts) -> set[str]:
    """The blocks whose identity changes the shape the next block sees (their replacement fails)."""
    out = set()
    for path in _dropped_blocks(parts):
        try:
            _without(twin, [path], images, torch.zeros(images.shape[0], dtype=torch.long))
        except RuntimeError:
            out.add(path)
    return out


def _reinit_failures(twin, images, labels, e: Expect, name: str, initial: dict, rows, levels, tol) -> list[str]:
    """(g) reinit at each level: the layer's weight and bias (and every name its weight is tied to) at
    α·initial + (1 − α)·trained. Layers whose weight is recomputed (LoRA, parametrizations, pruning)
    are left to (a)-(f)."""
    own = [n.rsplit(".", 1)[1] for n in e.zero]
    if (
        e.site is not None
        or any(o not in ("weight", "bias") for o in own)
        or any(f"{name}.{o}" not in initial for o in own)
    ):
        return []
    params = dict(twin.named_parameters(remove_duplicate=False))
    out = []
    for alpha in levels:
        values = {
            n: alpha * initial[f"{name}.{o}"].to(params[n].dtype) + (1 - alpha) * params[n].detach()
            for n, o in zip(e.zero, own)
        }
        expected, got = _loss_of(twin, images, labels, values), rows.get(("reinit", alpha), math.nan)
        if not _close(got, expected, tol):
            out.append(f"(g) {name}: reinit α={alpha} loss {got:.6f}, the interpolated weights {expected:.6f}")
    return out


def _part_failures(naive, twin, images, labels, parts: Parts, levels, refused, unremovable, tol) -> list[str]:
    """(g) head knockout, MLP-neuron knockout, block drop and block removal against their definitions."""
    rows = naive.set_index(["layer", "perturbation", "level"])["loss"]
    out = []

    def expect(path, perturbation, level, oracles):
        got = rows.get((path, perturbation, level))
        if got is None:
            out.append(f"(g) {path}: no {perturbation} cell at level {level}")
        elif not any(_close(got, o, tol) for o in oracles):
            out.append(
                f"(g) {path}: {perturbation} {level} loss {got:.6f}, its definition {min(oracles, key=lambda o: abs(o - got)):.6f}"
            )

    for path, weight, axis, heads, dim in parts.attention if "head_knockout" not in refused else ():
        for level in levels.get("head_knockout", []):
            expect(
                path,
                "head_knockout",
                level,
                [
                    _columns_zeroed(
                        twin, images, labels, weight, axis, [h * dim + j for h in chosen for j in range(dim)]
                    )
                    for chosen in _some_k(level, heads)
                ],
            )
    for path, weight, axis, neurons in parts.mlps if "mlp_neuron_knockout" not in refused else ():
        for level in levels.get("mlp_neuron_knockout", []):
            expect(
                path,
                "mlp_neuron_knockout",
                level,
                [_columns_zeroed(twin, images, labels, weight, axis, chosen) for chosen in _some_k(level, neurons)],
            )
    if "block_drop" in refused and refused["block_drop"] != ABSENT and not unremovable:
        out.append(f"(g) block_drop refused ({refused['block_drop']}), but every block it acts on keeps its shape")
    if "block_drop" not in refused and "block_drop" in levels:
        blocks = _dropped_blocks(parts)
        found = set(naive.layer[naive.perturbation == "block_drop"])
        if found != set(blocks):
            out.append(f"(g) block_drop acts on {sorted(found)}, by its definition on {blocks}")
        for path in set(blocks) - unremovable:
            expect(path, "block_drop", 1.0, [_without(twin, [path], images, labels)])
    for path, removable in parts.stages if "block_removal" not in refused else ():
        if not removable:
            if path in set(naive.layer[naive.perturbation == "block_removal"]):
                out.append(f"(g) {path}: block_removal acts on a stage with no identity-shortcut block")
            continue
        for level in levels.get("block_removal", []):
            chosen = _some_k(level, len(removable))
            expect(
                path,
                "block_removal",
                level,
                [_without(twin, [removable[i] for i in c], images, labels) for c in chosen],
            )
    return out
