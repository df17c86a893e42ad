"""``lesionbench verify DIR``: re-run a random sample of a run's cells and its clean passes, here, and compare.

What lets a leaderboard accept results computed elsewhere (an ImageNet-val run on someone's GPU):

1. the run directory must pass the results schema (:mod:`lesionbench.schema`: types, ranges, one
   row per cell, rows bound to the run, rows consistent with their per-image outcomes);
2. the study in its manifest, prepared here, must give the fingerprint the manifest records, and
   every row must be a cell of that plan;
3. ``sample`` cells drawn uniformly without replacement (seeded by ``seed``) from its perturbed
   cells, and every model's clean pass, are evaluated again from the manifest's study and
   compared with the file — rows and per-image outcomes:

   * **exact** when this machine has the run's device (the rows' ``device``) and the manifest's
     torch and lesionbench versions: every number of the row (timings aside) and every image's
     top-1 class and top-5 hit must be identical, except the loss, a float32 mean whose summation
     order follows the thread count, which may differ by 1e-5 relative (:data:`EXACT_LOSS_RTOL`);
   * **within tolerance** otherwise: at most a fraction ``tolerance`` (default 0.01) of the images
     may change their top-1 class or top-5 hit, the loss may differ by at most 1e-3 relative, and
     errors must agree. (Top-1/top-5 are then within ``tolerance`` too: the schema ties them to
     the outcomes.)

The run is accepted (exit 0) when nothing differs, rejected (exit 1) otherwise, with what differs.
A file with k forged perturbed cells out of n passes only if none of them is drawn:
:func:`pass_probability` (hypergeometric; a forged clean pass is always caught).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lesionbench.columns import CLEAN, KEY_COLUMNS, MANIFEST, cell_key
from lesionbench.errors import LesionbenchError
from lesionbench.schema import SchemaViolation, check_plan, read_manifest
from lesionbench.store import MemoryStore

COMPARED = [
    "top1",
    "top5",
    "loss",
    "n_images",
    "flip_rate",
    "seed",
    "num_classes",
    "layer_index",
    "nonfinite_weights",
    "nonfinite_outputs",
]
LOSS_RTOL = 1e-3
# same device and versions: a mean loss still moves in its last bits with the number of threads
# (measured: 3e-8 relative between committed rows and a re-run here), so exact allows float32 rounding
EXACT_LOSS_RTOL = 1e-5


def pass_probability(n: int, k: int, sample: int) -> float:
    """Chance that a run with ``k`` forged cells among its ``n`` perturbed cells passes a verify of
    ``sample`` cells drawn uniformly without replacement: none of the forged ones drawn,
    C(n − k, sample) / C(n, sample) (the hypergeometric probability of 0 successes)."""
    if not 0 <= k <= n or sample < 0:
        raise ValueError(f"need 0 ≤ k ≤ n and sample ≥ 0, got n={n}, k={k}, sample={sample}")
    sample = min(sample, n)
    return math.comb(n - k, sample) / math.comb(n, sample)


@dataclass
class Verdict:
    checked: list[str] = field(default_factory=list)  # the cells re-run
    differences: list[str] = field(default_factory=list)
    exact: bool = True  # compared exactly (same device and versions), else within the tolerance
    n_cells: int = 0  # perturbed cells in the file

    @property
    def ok(self) -> bool:
        return not self.differences


@dataclass
class _Replay(MemoryStore):
    """A memory store that says every cell of the file is done except those to evaluate again."""

    done: dict = field(default_factory=dict)

    def completed(self) -> dict:
        return dict(self.done) | super().completed()


def verify(
    run_dir: Path, sample: int = 5, seed: int = 0, tolerance: float = 0.01, device: str | None = None, registry=None
) -> Verdict:
    """Re-run ``sample`` random cells and the clean passes of the run in ``run_dir``; see the module doc.

    Returns a :class:`Verdict` (``ok``: accepted). Raises LesionbenchError for bad input (no run
    there, a study that cannot be prepared here, a bad ``sample`` or ``tolerance``)."""
    from lesionbench.api import subset_of
    from lesionbench.executors.local import execute
    from lesionbench.plan import prepare
    from lesionbench.registry import get_registry
    from lesionbench.results_io import read_results_with_outcomes
    from lesionbench.study import parse_study, with_overrides

    if sample < 0 or not 0 <= tolerance < 1:
        raise LesionbenchError(f"--sample must be ≥ 0 and --tolerance in [0, 1), got {sample} and {tolerance}")
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir / MANIFEST)
    if manifest is None:
        raise LesionbenchError(f"{str(run_dir)!r} is not a lesionbench run directory (no {MANIFEST})")
    verdict = Verdict()
    try:
        df, outcomes = read_results_with_outcomes(run_dir, allow_empty=False)
    except SchemaViolation as exc:
        verdict.differences.append(str(exc))
        return verdict
    study = parse_study(manifest["study"])
    if device is not None:
        study = with_overrides(study, device=device)
    plan = prepare(study, registry or get_registry())
    if plan.fingerprint() != manifest["fingerprint"]:
        verdict.differences.append(
            f"the manifest's study gives fingerprint {plan.fingerprint()} here, not the "
            f"{manifest['fingerprint']} it records (another dataset subset or levels?)"
        )
        return verdict
    try:
        check_plan(df, plan, run_dir / "results.csv")
    except SchemaViolation as exc:
        verdict.differences.append(str(exc))
        return verdict
    keys = [cell_key(*k) for k in df[KEY_COLUMNS].itertuples(index=False)]
    perturbed = sorted(k for k in keys if k[2] != CLEAN)
    verdict.n_cells = len(perturbed)
    chosen = set(random.Random(seed).sample(perturbed, min(sample, len(perturbed))))
    again = chosen | {k for k in keys if k[2] == CLEAN}
    done = {k: (float(t1), float(t5)) for k, t1, t5 in zip(keys, df["top1"], df["top5"]) if k not in again}
    store = _Replay(subset=subset_of(plan), done=done)
    execute(plan, store)
    fresh, fresh_outcomes = store.outcomes()
    import torch

    import lesionbench

    devices = set(df.loc[[k in again for k in keys], "device"].dropna())
    verdict.exact = (
        devices <= set(fresh["device"].dropna())
        and manifest.get("torch") == torch.__version__
        and manifest.get("lesionbench") == lesionbench.__version__
    )
    index = {k: i for i, k in enumerate(cell_key(*k) for k in fresh[KEY_COLUMNS].itertuples(index=False))}
    for k in sorted(again, key=str):
        i = keys.index(k)
        verdict.checked.append("/".join(map(str, k)))
        j = index.get(k)
        if j is None:
            verdict.differences.append(f"{_name(k)}: not evaluated again (not a cell of the study here)")
            continue
        verdict.differences += _compare_rows(
            k, df.iloc[i], fresh.iloc[j], outcomes, fresh_outcomes, verdict.exact, tolerance
        )
    return verdict


def _name(k) -> str:
    model, layer, perturbation, level, draw = k
    return f"{model} clean pass" if perturbation == CLEAN else f"{model} {layer} {perturbation} {level:g} #{draw}"


def _compare_rows(k, old: pd.Series, new: pd.Series, old_out, new_out, exact: bool, tolerance: float) -> list[str]:
    out = []
    if str(old["error"]) != str(new["error"]):
        out.append(f"{_name(k)}: error {old['error']!r} in the file, {new['error']!r} here")
    for c in COMPARED:
        a, b = float(old[c]), float(new[c])
        if math.isnan(a) and math.isnan(b):
            continue
        if c == "loss":
            close = abs(a - b) <= (EXACT_LOSS_RTOL if exact else LOSS_RTOL) * max(1.0, abs(b))
        else:
            close = a == b
        if c in ("top1", "top5", "flip_rate") and not exact:
            close = abs(a - b) <= tolerance + 1e-12
        if not close:
            out.append(f"{_name(k)}: {c} {a!r} in the file, {b!r} here")
    i, j = int(old["outcome"]), int(new["outcome"])
    if (i < 0) != (j < 0):
        out.append(f"{_name(k)}: per-image outcomes {'missing' if i < 0 else 'present'} in the file but not here")
    elif i >= 0:
        for which, what in ((1, "top-1 class"), (5, "top-5 hit")):
            a, b = _by_image(old_out, i, which), _by_image(new_out, j, which)
            if not a.index.equals(b.index):
                out.append(f"{_name(k)}: per-image outcomes cover other images than here")
                break
            differ = int((a.to_numpy() != b.to_numpy()).sum())
            allowed = 0 if exact else math.floor(tolerance * len(a))
            if differ > allowed:
                out.append(f"{_name(k)}: {what} differs on {differ} of {len(a)} images (allowed: {allowed})")
    return out


def _by_image(outcomes, row: int, which: int = 1) -> pd.Series:
    """A cell's per-image top-1 class (or top-5 hit), indexed by (dataset, split, index in the dataset)."""
    values = outcomes.top1[row] if which == 1 else outcomes.top5[row]
    seen = outcomes.top1[row] >= 0
    index = pd.MultiIndex.from_frame(outcomes.images.loc[seen, ["dataset", "split", "index"]])
    return pd.Series(np.asarray(values)[seen], index=index).sort_index()
