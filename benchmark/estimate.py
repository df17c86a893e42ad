"""What a study will do, before it does it: its cells per model and an estimate of the time they take.

``lesionbench plan STUDY`` (and ``lesionbench run --dry-run``) prepare the study exactly as a run does
(every check, the models built, the evaluation subset chosen; nothing evaluated on it, nothing
written), count the cells, and time one forward pass of each model over a few images of the subset.
The estimate is that pass scaled to the subset, times the cells: an upper bound for the naive engine's
full passes; the fast engine (the default) runs only the part of the network after the damaged layer,
so a study of its layers takes less, the more so the deeper the layers it damages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lesionbench.data import build_eval_set
from lesionbench.evaluate import evaluate, resolve_device
from lesionbench.plan import Plan, PreparedModel, model_dtype

PROBE_IMAGES = (
    64  # images timed per model (at most a batch): per-batch overhead shared as in a run, quick for a big net
)


@dataclass(frozen=True)
class ModelEstimate:
    """One model's share of a study. ``cells``: its rows, the clean pass included (adaptive draws may
    add up to ``extra_cells``); ``pass_seconds``: one forward pass over the evaluation subset, measured
    on up to :data:`PROBE_IMAGES` images (None when not measured); ``seconds``: cells × pass (upper bound)."""

    model: str
    layers: int
    blocks: int
    cells: int
    extra_cells: int
    pass_seconds: float | None

    @property
    def seconds(self) -> float | None:
        return None if self.pass_seconds is None else self.cells * self.pass_seconds


def estimate(plan: Plan, measure: bool = True, probe_images: int = PROBE_IMAGES) -> list[ModelEstimate]:
    """Per model of ``plan``: layers, blocks (layer × perturbation), cells and, with ``measure``, the
    time of one full pass over the evaluation subset (seconds, on the study's device)."""
    out = []
    for prepared in plan.models:
        blocks = plan.blocks(prepared)
        cells = plan.cells(prepared)
        extra = 0
        if plan.adaptive:  # a random block may grow to max_draws draws per level
            extra = sum(
                max(0, plan.study.max_draws - plan.study.draws)
                * len(
                    {
                        c.level
                        for c in plan.block_cells(prepared, b)
                        if not c.is_identity and not c.perturbation.deterministic
                    }
                )
                for b in blocks
            )
        seconds = _pass_seconds(plan, prepared, probe_images) if measure else None
        out.append(
            ModelEstimate(
                prepared.loaded.name, len({b.layer for b in blocks}), len(blocks), len(cells) + 1, extra, seconds
            )
        )
    return out


def _pass_seconds(plan: Plan, prepared: PreparedModel, probe_images: int) -> float:
    """Seconds of one forward pass over the whole evaluation subset: the faster of two timed passes over
    one batch of a few images (after an untimed one, so lazy initialisation is not counted), scaled to
    the subset. The model is left where it was."""
    device = resolve_device(plan.study.device)
    count = max(1, min(probe_images, plan.study.batch_size, len(plan.indices)))
    probe = build_eval_set(plan.raw, plan.indices[:count], prepared.loaded.preprocess)
    module = prepared.loaded.module
    original = next((t.device for t in module.parameters()), torch.device("cpu"))
    images = probe.images.to(dtype=model_dtype(module))
    module.to(device)
    try:
        timings = []
        with torch.no_grad():
            for _ in range(3):
                start = time.perf_counter()
                evaluate(module, images, probe.labels, plan.study.batch_size, device, plan.study.autocast)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timings.append(time.perf_counter() - start)
        elapsed = min(timings[1:])
    finally:
        module.to(original)
    return elapsed / len(probe.labels) * len(plan.indices)


def clock_text(seconds: float) -> str:
    """``1 h 05 min``, ``12 min 30 s`` or ``45 s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
