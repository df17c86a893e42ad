"""A result row: what a cell's row holds, and whether the clean model is beyond chance.

:class:`lesionbench.cells.ModelRunner` builds every row of a run with :func:`cell_row` (the columns
are :data:`lesionbench.columns.COLUMNS`); the clean row carries, for a language model, the chance
accuracy of the unigram predictor (:func:`unigram_chance`), and :func:`chance_warning` says when a
model's clean accuracy is not beyond chance (a model built without its weights…).
"""

from __future__ import annotations

import torch

from lesionbench.columns import CLEAN
from lesionbench.evaluate import EvalResult
from lesionbench.kinds import LINEAR
from lesionbench.plan import Cell, Plan


def cell_row(
    plan: Plan,
    model: str,
    cell: Cell | None,
    seed: int | None,
    result: EvalResult | None,
    error: str = "",
    nonfinite: int | None = None,
    nonfinite_out: int | None = None,
) -> dict:
    """The result row of ``cell`` of ``model`` (the clean row when ``cell`` is None): the columns of
    :data:`lesionbench.columns.COLUMNS` but ``flip_rate`` and the per-image outcomes (added by
    :meth:`lesionbench.cells.ModelRunner.with_outcomes`) and the clean row's ``chance_top1``/``chance_top5``
    (:func:`unigram_chance`); ``seed`` None is the study's. ``result``
    None (a failed cell) leaves the measured columns out; ``nonfinite`` counts NaN/Inf weights,
    ``nonfinite_out`` NaN/Inf layer outputs."""
    row = {
        "model": model,
        "dataset": plan.study.dataset.name,
        "layer": cell.layer.display if cell else "",
        "layer_index": cell.layer.index if cell else -1,
        "relative_depth": cell.layer.relative_depth if cell else float("nan"),
        "perturbation": plan.row_name(cell.perturbation) if cell else CLEAN,
        "level": float(cell.level) if cell else 0.0,
        "draw": cell.draw if cell else 0,
        "seed": seed if seed is not None else plan.study.seed,
        "num_classes": plan.raw.num_classes,
        "error": error,
        "nonfinite_weights": nonfinite if nonfinite is not None else (0 if cell else None),
        "nonfinite_outputs": nonfinite_out,  # hook perturbations only: NaN/Inf values the damaged layer emitted
        "level_axis": cell.perturbation.axis.kind.name if cell else LINEAR.name,
        "level_unit": cell.perturbation.axis.label if cell else "",
    }
    if result is not None:
        row.update(
            top1=result.top1,
            top5=result.top5,
            loss=result.loss,
            n_images=result.n_images,
            seconds=result.seconds,
            images_per_s=result.images_per_s,
            device=result.device,
        )
    return row


def chance_warning(
    name: str, clean: EvalResult, num_classes: int, metric: str, unigram: dict[str, float] | None = None
) -> str:
    """A one-line warning when a model's clean accuracy is not beyond chance, else "".

    Beyond chance is :func:`lesionbench.scores.beyond_chance` (a one-sided exact binomial test at
    level 0.05 against k/classes for top-k over the evaluated images): such a model is not scored.
    A language model (``unigram``: :func:`unigram_chance` of its targets) must beat the unigram
    predictor instead; one that does not is warned of, its layer scores meaning nothing.
    """
    if unigram:  # text: no better than the unigram predictor (a model built without its weights…)
        given, accuracy = unigram[f"chance_{metric}"], getattr(clean, metric)
        return (
            ""
            if accuracy > given
            else (
                f"{name}: clean next-token {metric} accuracy {accuracy:.3f} is no "
                f"better than the unigram predictor's ({given:.3f}); were its weights loaded? Its layer scores will "
                "mean nothing."
            )
        )
    from lesionbench.scores import NOT_SCORED, beyond_chance, chance_level

    chance = chance_level(metric, num_classes)
    accuracy, n = float(getattr(clean, metric)), max(1, clean.n_images)
    if chance >= 1.0 or beyond_chance(accuracy, n, chance):
        return ""
    return (
        f"{name}: clean {metric} accuracy {accuracy:.3f} on {clean.n_images} images is at chance ({chance:g}); "
        f"were its weights loaded? It is {NOT_SCORED}."
    )


def unigram_chance(targets: torch.Tensor) -> dict[str, float]:
    """Chance for next-token prediction: the top-1 and top-5 accuracy on ``targets`` (int64 [windows,
    T]) of the unigram-frequency predictor, which always names the 1 (5) most frequent tokens of these
    targets — the best prediction that ignores the context, as k/classes is for balanced classes.
    Returned as the clean row's ``chance_top1`` / ``chance_top5`` (fractions)."""
    counts = torch.bincount(targets.reshape(-1)).sort(descending=True).values.double()
    total = float(counts.sum())
    return {f"chance_top{k}": float(counts[:k].sum()) / total for k in (1, 5)}
