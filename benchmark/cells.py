"""Evaluating cells: one model on one device, a block (layer × perturbation) at a time.

:class:`ModelRunner` holds a model's evaluation set, engine and clean result, and turns a block
into rows: each cell perturbs one layer in place, (re-estimates BatchNorm statistics,) evaluates
and restores. With the fast engine a block's draws can be captured as damaged copies and
evaluated together in one batched pass. Executors (local, Ray) call it; it knows nothing of them.

What a row holds is in :mod:`lesionbench.rows`, the BatchNorm re-estimation in
:mod:`lesionbench.recalibration` (``recalibrate``, ``chance_warning`` and ``unigram_chance`` stay
importable from here).
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext

import numpy as np
import torch

from lesionbench.data import EvalSet, EvalSetCache
from lesionbench.engine import create_engine
from lesionbench.errors import LesionbenchError
from lesionbench.evaluate import EvalResult, merge_results, resolve_device
from lesionbench.layers import Layer
from lesionbench.perturbation import (
    Snapshot,
    generator_for,
    model_checksum,
    nonfinite_count,
    nonfinite_outputs,
    perturbed,
)
from lesionbench.plan import Block, Cell, Plan, PreparedModel
from lesionbench.recalibration import norms_reached, recalibrate
from lesionbench.rows import cell_row, chance_warning, unigram_chance
from lesionbench.state import frozen_observers
from lesionbench.store import NONFINITE, OUTCOME

log = logging.getLogger("lesionbench")


class ModelRunner:
    """One model on one device: its evaluation set, engine and clean result; evaluates blocks.

    Both executors use it: the local one in-process, the Ray one inside each worker.
    """

    def __init__(
        self,
        plan: Plan,
        prepared: PreparedModel,
        eval_set: EvalSet,
        calibration: EvalSet | None = None,
        debug: bool = False,
        note: Callable[[str], None] = lambda _t: None,
    ):
        study = plan.study
        self.plan, self.prepared, self.debug, self.note = plan, prepared, debug, note
        self.name = prepared.loaded.name
        self.device = resolve_device(study.device)
        if eval_set.skipped:
            log.warning("%s: %d unreadable images skipped", self.name, eval_set.skipped)
            note(f"{self.name}: {eval_set.skipped} unreadable images skipped; evaluated on {len(eval_set)}")
        images = eval_set.images.to(prepared.dtype)  # the model's own dtype (float16, bfloat16…)
        module = prepared.loaded.module.to(self.device)
        if study.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
            module = module.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            images = images.pin_memory()
        self.module = module
        self._frozen = ExitStack()  # quantization observers off while this runner holds the model
        self._frozen.enter_context(frozen_observers(module))
        self.calibration = calibration.images.to(prepared.dtype) if calibration is not None else None
        self.reference = model_checksum(module) if debug else None
        # a language model's labels are its input's next tokens: [windows, T], scored per token
        targets = prepared.loaded.targets
        labels = targets(eval_set.images) if targets is not None else eval_set.labels
        self.chance = unigram_chance(labels) if labels.dim() == 2 else {}
        self.engine = create_engine(
            study.engine, prepared.graph, images, labels, study.batch_size, self.device, study.autocast
        )
        self.clean = self.engine.full()
        warning = chance_warning(self.name, self.clean, plan.raw.num_classes, study.metric, self.chance)
        if warning:  # e.g. a model built without its weights: every score of the study would be 0
            log.warning(warning)
            note(warning)
        self.added = 0  # adaptive draws: cells added beyond the planned draws
        self._partial = False  # evaluating one shard: rows carry their result until all shards are merged
        self.shard_passes = 0  # cells evaluated once more because their layer's images came in several shards
        # positions of the evaluated images in the study's subset (an unreadable image leaves a gap)
        self.positions = None if not eval_set.skipped else np.searchsorted(plan.indices, eval_set.indices)

    def with_outcomes(self, row: dict, result: EvalResult | None) -> dict:
        """Add a cell's per-image outcomes (by position in the evaluation subset) and its flip rate:
        the fraction of images whose top-1 class differs from the clean model's."""
        if self._partial:
            row["_result"] = result
            return row
        if result is None or result.predictions is None:
            return row
        top1, top5 = result.predictions, result.top5_hit
        # per-token outcomes (hit counts per window) have no top-1 class to compare: no flip rate
        counted = result.tokens is not None
        row["flip_rate"] = float(np.mean(top1 != self.clean.predictions)) if len(top1) and not counted else float("nan")
        if self.positions is not None:
            n = len(self.plan.indices)
            top1, top5 = np.full(n, -1, np.int32), np.zeros(n, top5.dtype)
            top1[self.positions], top5[self.positions] = result.predictions, result.top5_hit
        row[OUTCOME] = (top1, top5)
        return row

    def clean_row(self) -> dict:
        row = cell_row(self.plan, self.name, None, None, self.clean) | self.chance
        return self.with_outcomes(row, self.clean)

    def block_rows(self, block: Block, done=frozenset()) -> Iterator[tuple[dict | None, str]]:
        """Evaluate a block's cells not in ``done``: yields (row, label), row None for a cell done earlier.

        With the fast engine, the draws and levels of a block are perturbed one after another,
        their damaged tensors copied, and evaluated together in batched passes (see
        :class:`lesionbench.engine.LayerEval`); rows come out once their pass is done. With
        adaptive draws (``target_ci``) further draws follow, round by round, where
        :meth:`Plan.extra_cells` asks for them; ``done`` (key → (top1, top5), as
        ``Store.completed()`` gives) then also says what earlier draws measured.
        """
        plan = self.plan
        cells = plan.block_cells(self.prepared, block)
        if plan.settled(self.prepared, block, done) if plan.adaptive else all(self.key(c) in done for c in cells):
            for c in cells:
                yield None, plan.label(self.name, c)
            return
        layer = cells[0].layer
        saved = Snapshot(layer, norms_reached(self.prepared.graph, layer) if self.calibration is not None else ())
        column = "top1" if plan.study.metric == "top1" else "top5"
        shards = self.engine.shards(layer)
        todo, made, values = cells, [], {}
        while todo:
            values.update(plan.block_values(self.name, todo, done))
            for row, label in self._evaluate_shards(todo, layer, shards, saved, done):
                if row is not None:
                    value = row.get(column)
                    values[(row["level"], row["draw"])] = math.nan if value is None else float(value)
                yield row, label
            made += todo
            todo = plan.extra_cells(made, values)
            self.added += sum(self.key(c) not in done for c in todo)

    def _evaluate_shards(
        self, cells: list[Cell], layer: Layer, shards: list[tuple[int, int]], saved: Snapshot, done
    ) -> Iterator[tuple[dict | None, str]]:
        """One round of a block's cells over every shard of the images, each cell with the same
        damage (same seed) on each shard; a cell's row comes once all its shards are merged."""
        if len(shards) == 1:
            with self.engine.for_layer(layer) as run_eval:
                yield from self._evaluate(cells, run_eval, saved, done)
            return
        order: list[tuple[tuple | None, str]] = []
        parts: dict[tuple, list[dict]] = {}
        for number, shard in enumerate(shards):
            with self.engine.for_layer(layer, shard) as run_eval:
                self._partial = True
                try:
                    for row, label in self._evaluate(cells, run_eval, saved, done):
                        key = None if row is None else (row["layer"], row["perturbation"], row["level"], row["draw"])
                        if number == 0:
                            order.append((key, label))
                        if row is not None:
                            parts.setdefault(key, []).append(row)
                finally:
                    self._partial = False
        self.shard_passes += sum(len(rows) - 1 for rows in parts.values())
        for key, label in order:
            yield (None if key is None else self._merged_row(parts[key])), label

    def _merged_row(self, rows: list[dict]) -> dict:
        """A cell's row from its rows on each shard: results merged (see :func:`merge_results`); a
        cell that failed on some shard keeps that shard's error and no result."""
        results = [row.pop("_result", None) for row in rows]
        failed = next((row for row, result in zip(rows, results) if result is None), None)
        if failed is not None:
            return failed
        if all(result is self.clean for result in results):  # an identity cell: the clean pass, once
            return self.with_outcomes(rows[0], self.clean)
        merged = merge_results(results)
        row = dict(rows[0])
        outputs = [r.get("nonfinite_outputs") for r in rows]
        if outputs[0] is not None:
            row["nonfinite_outputs"] = sum(outputs)
        row.update(
            top1=merged.top1,
            top5=merged.top5,
            loss=merged.loss,
            n_images=merged.n_images,
            seconds=merged.seconds,
            images_per_s=merged.images_per_s,
        )
        row["error"] = next((r["error"] for r in rows if r["error"] and r["error"] != NONFINITE), "")
        if not row["error"] and not math.isfinite(merged.loss):
            row["error"] = NONFINITE
        return self.with_outcomes(row, merged)

    def _evaluate(self, cells: list[Cell], run_eval, saved: Snapshot, done) -> Iterator[tuple[dict | None, str]]:
        """One round of a block's cells: one at a time, or captured and evaluated in batched passes."""
        batchable = (
            run_eval.many is not None
            and self.calibration is None
            and (self.plan.study.batch_draws if self.plan.study.batch_draws is not None else self.device.type == "cuda")
            and sum(not c.is_identity and self.key(c) not in done for c in cells) > 1
        )
        pending: list[tuple[Cell, int, dict[str, torch.Tensor], int]] = []
        for cell in cells:
            label = self.plan.label(self.name, cell)
            if self.key(cell) in done:
                yield None, label
                continue
            if not batchable or cell.is_identity:
                yield self._cell_row(cell, run_eval, saved), label
            else:
                captured = self._capture(cell, saved)
                if captured is None:  # hooks, or the plugin failed: this cell alone, the rest one by one too
                    batchable = False
                    yield from self._flush(pending, run_eval, saved)
                    yield self._cell_row(cell, run_eval, saved), label
                    continue
                pending.append(captured)
                if len(pending) >= run_eval.capacity(sum(t.numel() * t.element_size() for t in captured[2].values())):
                    yield from self._flush(pending, run_eval, saved)
            self._check_restored(label)
        yield from self._flush(pending, run_eval, saved)

    def _capture(self, cell: Cell, saved: Snapshot) -> tuple[Cell, int, dict[str, torch.Tensor], int] | None:
        """Apply one cell's perturbation, copy the layer's damaged tensors, restore; None if not possible."""
        seed = self._seed(cell)
        tensors = cell.layer.named_tensors()
        try:
            with perturbed(cell.layer, cell.perturbation, cell.level, generator_for(seed), saved=saved) as hooked:
                if hooked:
                    return None
                nonfinite = nonfinite_count(cell.layer)
                copies = {k: t.detach().clone() for k, t in cell.layer.named_tensors().items()}
        except (LesionbenchError, KeyboardInterrupt):
            raise
        except Exception:  # recorded as the cell's error by the one-at-a-time path
            return None
        if copies.keys() != tensors.keys():
            return None
        return cell, seed, copies, nonfinite

    def _flush(self, pending: list, run_eval, saved: Snapshot) -> Iterator[tuple[dict, str]]:
        """Evaluate the captured cells in one batched pass (one by one if the pass fails)."""
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        current = batch[0][0].layer.named_tensors()  # restored: the clean tensors
        changed = [k for k, t in current.items() if any(not torch.equal(c[k], t) for _c, _s, c, _n in batch)]
        keys = changed or [next(iter(current))]  # vmap needs one batched input even if nothing changed
        try:
            results = run_eval.many([{k: copies[k] for k in keys} for _cell, _seed, copies, _n in batch])
        except (LesionbenchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # an op vmap cannot batch: the cells are evaluated one at a time
            self.engine.notes.append(f"{batch[0][0].layer.name}: draws evaluated one at a time ({type(exc).__name__})")
            for cell, *_rest in batch:
                yield self._cell_row(cell, run_eval, saved), self.plan.label(self.name, cell)
            return
        for (cell, seed, _copies, nonfinite), result in zip(batch, results):
            error = NONFINITE if not math.isfinite(result.loss) else ""
            row = cell_row(self.plan, self.name, cell, seed, result, error, nonfinite)
            yield self.with_outcomes(row, result), self.plan.label(self.name, cell)

    def _check_restored(self, label: str) -> None:
        if self.debug and model_checksum(self.module) != self.reference:
            raise LesionbenchError(f"model {self.name!r} was not restored exactly after {label}")

    def _seed(self, cell: Cell) -> int:
        return self.plan.seed(self.name, cell)

    def key(self, cell: Cell):
        return self.plan.key(self.name, cell)

    def notes(self) -> list[str]:
        extra = (
            [f"adaptive draws (target_ci {self.plan.study.target_ci}): {self.added} cells added"] if self.added else []
        )
        if self.shard_passes:
            extra.append(
                f"images in shards of at most {getattr(self.engine, 'budget_bytes', 0)} bytes of cache: "
                f"{self.shard_passes} extra cell passes (damage applied once per shard)"
            )
        return [f"{self.name}: {n}" for n in getattr(self.engine, "notes", []) + extra]

    def _cell_row(self, cell: Cell, run_eval: Callable[[], EvalResult], saved: Snapshot) -> dict:
        """Perturb, (recalibrate,) evaluate, restore: one row."""
        plan = self.plan
        seed = self._seed(cell)
        if cell.is_identity:  # the clean pass's numbers, reused: no evaluation, so no time of its own
            row = cell_row(plan, self.name, cell, seed, self.clean) | {"seconds": 0.0, "images_per_s": float("nan")}
            return self.with_outcomes(row, self.clean)
        norms = saved.also  # the BatchNorms to re-estimate (bn_recalibrate), found once per block
        error, result, nonfinite, outputs = "", None, None, None
        try:
            with perturbed(
                cell.layer, cell.perturbation, cell.level, generator_for(seed), also=norms, saved=saved
            ) as hooked:
                nonfinite = nonfinite_count(cell.layer)
                if norms:
                    recalibrate(self.module, norms, self.calibration, plan.study.batch_size, self.device)
                with nonfinite_outputs(cell.layer) if hooked else nullcontext() as outputs:
                    result = run_eval()
        except (LesionbenchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a faulty plugin fails its own cell, not the study
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("%s failed: %s", plan.label(self.name, cell), error)
            self.note(f"{plan.label(self.name, cell)} failed:\n{''.join(traceback.format_exception(exc)).rstrip()}")
        if result is not None and not math.isfinite(result.loss):
            error = error or NONFINITE
        row = cell_row(
            plan, self.name, cell, seed, result, error, nonfinite, outputs[0] if outputs and result else None
        )
        return self.with_outcomes(row, result)

    def close(self) -> None:
        self.engine.close()
        self._frozen.close()
        self.prepared.loaded.module.to("cpu")


def eval_sets(plan: Plan, cache: EvalSetCache, prepared: PreparedModel) -> tuple[EvalSet, EvalSet | None]:
    """The model's evaluation set (and calibration set), decoded once per preprocessing."""
    loaded = prepared.loaded
    eval_set = cache.get(plan.raw, plan.indices, loaded.preprocess, loaded.preprocess_key)
    calibration = None
    if plan.calibration is not None:
        calibration = cache.get(plan.raw, plan.calibration, loaded.preprocess, loaded.preprocess_key + "|calibration")
    return eval_set, calibration
