"""Scoring passes over an evaluation set: top-1, top-5, mean cross-entropy, timing.

Runs in eval mode under ``torch.inference_mode()``. On CUDA the images travel from pinned memory
with non-blocking copies and the pass is timed with CUDA events; on the CPU with perf_counter.
:func:`evaluate_batches` scores any per-batch forward function, so the fast engine (which runs
only the part of a network downstream of a perturbed layer) is scored by the same code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lesionbench.errors import LesionbenchError


@dataclass(frozen=True)
class EvalResult:
    """One pass over the evaluation set: accuracies (fractions), mean cross-entropy, wall seconds.

    ``predictions`` (int32 [n_images]) is each image's top-1 class and ``top5_hit`` (bool
    [n_images]) whether its label was among the five highest scores, in the order of the
    evaluation set; None when the pass did not keep them. ``batch_losses`` (float64 [n_batches])
    is each batch's summed cross-entropy, which :func:`merge_results` adds up in the same order
    as one pass would (so a sharded evaluation gives the same ``loss``, bit for bit). With labels
    per position (a language model's next tokens, ``tokens`` = T per window) the items are windows,
    the accuracies and loss are per token, and ``predictions`` / ``top5_hit`` are int32 counts of
    the window's top-1 / top-5 hits (0…T).
    """

    top1: float
    top5: float
    loss: float
    n_images: int
    seconds: float
    images_per_s: float
    device: str
    predictions: np.ndarray | None = field(default=None, compare=False, repr=False)
    top5_hit: np.ndarray | None = field(default=None, compare=False, repr=False)
    batch_losses: np.ndarray | None = field(default=None, compare=False, repr=False)
    tokens: int | None = None  # predictions per item when the labels are per position (else None)


# The recorded top-1 class of an image whose logits hold NaN/Inf (a transient fault can hit some
# images of a batch and not others): not a class, not "not evaluated" (-1).
NO_PREDICTION = 2**31 - 1


def logits_of(output: Any) -> torch.Tensor:
    """The class scores in what a model returns: a tensor; the first element of a tuple or list;
    the ``logits`` entry of a mapping or attribute of an output object (Hugging Face style).

    Raises LesionbenchError when none of these is a tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    raise LesionbenchError(
        f"the model returns {type(output).__name__}, not class scores: lesionbench takes a tensor, the first "
        "element of a tuple/list, or the 'logits' entry of a mapping"
    )


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None means CUDA when present, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_context(device: torch.device, enabled: bool):
    """Mixed precision when asked for: float16 on CUDA, bfloat16 on the CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def evaluate_batches(
    forward: Callable[[int], torch.Tensor],
    labels: Sequence[torch.Tensor],
    device: torch.device,
    autocast: bool = False,
    variants: int | None = None,
) -> EvalResult | list[EvalResult]:
    """Score ``forward(i)`` (the logits of batch i) against ``labels[i]`` for every batch.

    With ``variants=D``, ``forward(i)`` returns D stacked logits ``[D, batch, classes]`` — several
    perturbed copies of a network evaluated in one pass — and one result per copy is returned,
    each charged an equal share of the time. Every result keeps its per-image outcomes
    (``predictions``, ``top5_hit``). Labels int64 [batch, T] (a position each) score logits
    [batch·T, classes] token by token, with per-window hit counts as outcomes.
    """
    d = variants or 1
    n = sum(len(y) for y in labels)
    tokens = labels[0].shape[1] if len(labels) and labels[0].dim() == 2 else None
    scored = sum(y.numel() for y in labels)  # predictions scored: images, or windows × T
    correct1 = torch.zeros(d, dtype=torch.int64)
    correct5 = torch.zeros(d, dtype=torch.int64)
    loss_sum = torch.zeros(d, dtype=torch.float64)
    predicted: list[torch.Tensor] = []  # [d, batch] top-1 classes, per batch
    batch_losses: list[torch.Tensor] = []  # [d] float64 summed losses, per batch
    in_top5: list[torch.Tensor] = []
    cuda = device.type == "cuda"
    if cuda:
        start_evt, end_evt = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_evt.record()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, y in enumerate(labels):
            y = y.to(device, non_blocking=True)
            with autocast_context(device, autocast):
                logits = logits_of(forward(i))
            per_window = y.shape[1] if y.dim() == 2 else None
            y = y.reshape(-1)
            logits = logits.float().reshape(d, len(y), -1)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            # an image whose logits are not all finite has no prediction: it counts as wrong, and its
            # recorded class is NO_PREDICTION (never a label, always a change from the clean one)
            finite = torch.isfinite(logits).all(dim=-1)  # [d, batch]
            hit = (top == y[None, :, None]) & finite[..., None]
            correct1 += hit[..., 0].sum(dim=1).cpu()
            any5 = hit.any(dim=-1)
            correct5 += any5.sum(dim=1).cpu()
            if per_window is None:
                predicted.append(torch.where(finite, top[..., 0], NO_PREDICTION).to(torch.int32).cpu())
                in_top5.append(any5.cpu())
            else:  # hits per window
                predicted.append(hit[..., 0].reshape(d, -1, per_window).sum(dim=-1).to(torch.int32).cpu())
                in_top5.append(any5.reshape(d, -1, per_window).sum(dim=-1).to(torch.int32).cpu())
            loss = F.cross_entropy(logits.reshape(d * len(y), -1), y.repeat(d), reduction="none")
            batch_loss = loss.reshape(d, len(y)).sum(dim=1).double().cpu()
            loss_sum += batch_loss
            batch_losses.append(batch_loss)
    if cuda:
        end_evt.record()
        torch.cuda.synchronize(device)
        seconds = start_evt.elapsed_time(end_evt) / 1000.0
    else:
        seconds = time.perf_counter() - t0
    seconds /= d
    predictions = torch.cat(predicted, dim=1).numpy() if predicted else np.zeros((d, 0), np.int32)
    top5_hit = torch.cat(in_top5, dim=1).numpy() if in_top5 else np.zeros((d, 0), bool)
    losses = torch.stack(batch_losses, dim=1).numpy() if batch_losses else np.zeros((d, 0), np.float64)
    results = [
        EvalResult(
            top1=int(correct1[j]) / scored,
            top5=int(correct5[j]) / scored,
            loss=float(loss_sum[j]) / scored if math.isfinite(float(loss_sum[j])) else float("nan"),
            n_images=n,
            seconds=seconds,
            images_per_s=n / seconds if seconds > 0 else float("inf"),
            device=str(device),
            predictions=predictions[j],
            top5_hit=top5_hit[j],
            batch_losses=losses[j],
            tokens=tokens,
        )
        for j in range(d)
    ]
    return results if variants is not None else results[0]


def merge_results(parts: Sequence[EvalResult]) -> EvalResult:
    """One result from passes over consecutive parts of an evaluation set (shards, in order).

    Counts and per-image outcomes are concatenated, the per-batch losses summed in order
    (float64, as :func:`evaluate_batches` sums them), seconds added: equal to one pass over all
    the images when the parts were cut at batch boundaries (``seconds`` aside). Raises
    ValueError when a part lacks its per-image outcomes or batch losses.
    """
    if len(parts) == 1:
        return parts[0]
    if any(p.predictions is None or p.top5_hit is None or p.batch_losses is None for p in parts):
        raise ValueError("merge_results needs every part's predictions, top5_hit and batch_losses")
    n = sum(p.n_images for p in parts)
    unit = parts[0].tokens or 1  # predictions scored per item: 1 for an image, T for a text window
    scored = n * unit
    correct1 = sum(round(p.top1 * p.n_images * unit) for p in parts)
    correct5 = sum(round(p.top5 * p.n_images * unit) for p in parts)
    total = torch.zeros(1, dtype=torch.float64)
    for p in parts:
        for value in p.batch_losses:
            total += float(value)
    seconds = sum(p.seconds for p in parts)
    return EvalResult(
        top1=correct1 / scored,
        top5=correct5 / scored,
        loss=float(total[0]) / scored if math.isfinite(float(total[0])) else float("nan"),
        n_images=n,
        seconds=seconds,
        images_per_s=n / seconds if seconds > 0 else float("inf"),
        device=parts[0].device,
        predictions=np.concatenate([p.predictions for p in parts]),
        top5_hit=np.concatenate([p.top5_hit for p in parts]),
        tokens=parts[0].tokens,
        batch_losses=np.concatenate([p.batch_losses for p in parts]),
    )


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast: bool = False,
) -> EvalResult:
    """Accuracy and loss of ``model`` on ``images``; the model must already be on ``device``."""
    device = resolve_device(str(device) if device is not None else None)
    model.eval()
    starts = range(0, len(labels), batch_size)
    label_batches = [labels[b : b + batch_size] for b in starts]

    def forward(i: int) -> torch.Tensor:
        b = starts[i]
        return model(images[b : b + batch_size].to(device, non_blocking=True))

    return evaluate_batches(forward, label_batches, device, autocast)
