"""``lesionbench train``: reproduce the weights of the offline models from their datasets.

Kept deliberately plain (Adam, cosine schedule, horizontal flips) so that anyone can rerun it and
get weights of the accuracy recorded next to the shipped file.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesionbench.data import build_eval_set
from lesionbench.evaluate import evaluate
from lesionbench.model_sources import ModelSpec, create_model
from lesionbench.registry import Registry


@dataclass
class TrainConfig:
    model: str
    dataset: str = "fashion_mnist"
    data: str | None = None
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    options: dict | None = None


def train(config: TrainConfig, registry: Registry, out: Path, log=print) -> dict:
    """Train ``config.model`` from scratch; write ``out`` (state dict) and ``out.json`` (record)."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    spec = ModelSpec(config.model, weights="none", options=config.options or {})
    loaded = create_model(spec, {k: c.obj for k, c in registry.contributions("models").items()})
    source = registry.get("datasets", config.dataset)
    train_raw = source.load(config.data, "train")
    test_raw = source.load(config.data, "test")
    t0 = time.perf_counter()
    train_set = build_eval_set(train_raw, np.arange(len(train_raw)), loaded.preprocess)
    test_set = build_eval_set(test_raw, np.arange(len(test_raw)), loaded.preprocess)
    log(f"decoded {len(train_set)} training and {len(test_set)} test images in {time.perf_counter() - t0:.1f}s")

    model = loaded.module
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(train_set) + config.batch_size - 1) // config.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=gen)
        total = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            x, y = train_set.images[idx], train_set.labels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        acc = evaluate(model, test_set.images, test_set.labels, batch_size=1000)
        log(
            f"epoch {epoch + 1}/{config.epochs}: train loss {total / len(train_set):.4f}, "
            f"test top-1 {acc.top1:.4f} ({time.perf_counter() - start:.0f}s)"
        )
    model.eval()
    final = evaluate(model, test_set.images, test_set.labels, batch_size=1000)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(out)
    record = {
        "model": config.model,
        "dataset": config.dataset,
        "options": config.options or {},
        "test_top1": round(final.top1, 4),
        "test_top5": round(final.top5, 4),
        "test_images": len(test_set),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "train_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": "lesionbench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record
