"""How long the ImageNet track will take, from a few cells per model (issue #17).

    python perf/track_timing.py --data IMAGENET_FOLDER [--models efficientnet_lite0,...] [--images 100]

Per model of the ``imagenet-track`` preset: one cell at each of its layers (weight noise 1.0, one
draw) on ``--images`` images, through :func:`lesionbench.api.run` with the preset's own settings;
the cells' cost in clean passes (robust to other jobs on the machine, which slow both alike); the
preset's cell count; and the CPU time of one thread for a clean pass over 50 images (what an idle
core would take). Prints the estimate of the preset's wall time per model on an idle machine with
``--cores`` cores (``--scaling``: the speed-up of that many threads over one).
"""

from __future__ import annotations

import argparse
import time

import torch

from lesionbench.api import run
from lesionbench.model_sources import create_model
from lesionbench.registry import get_registry
from lesionbench.study import load_study


def one_thread_seconds_per_image(model: str, images: int = 50) -> float:
    """CPU seconds of one thread per image for a clean forward pass, NHWC (the preset's layout)."""
    sources = {k: c.obj for k, c in get_registry().contributions("models").items()}
    loaded = create_model(model, sources)
    module = loaded.module.eval().to(memory_format=torch.channels_last)
    x = torch.randn(images, *loaded.input_size).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            module(x[:5])
            start = time.process_time()
            module(x)
            return (time.process_time() - start) / images
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", help="comma-separated (default: the preset's)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--scaling", type=float, default=1.7, help="speed-up of --cores threads over one")
    args = parser.parse_args()
    presets = {k: c.obj for k, c in get_registry().contributions("studies").items()}
    study = load_study("imagenet-track", presets)
    models = args.models.split(",") if args.models else [m.ref for m in study.models]
    per_layer = sum(study.draws * sum(lv != 0.0 for lv in study.levels[p]) for p in study.perturbations)
    n = study.dataset.n_images
    print(f"imagenet-track: {study.layer_count} layers × {per_layer} damaged cells per layer, {n} images\n")
    print(
        "| model | 1 cell per layer, in clean passes | clean pass, one thread, per image | estimated wall time, idle |"
    )
    print("|---|---|---|---|")
    total = 0.0
    for model in models:
        rows = run(
            "imagenet-track",
            models=[model],
            perturbations=["weight_noise"],
            levels=[0.0, 1.0],
            draws=1,
            n_images=args.images,
            data=args.data,
            device="cpu",
        )
        clean = rows.loc[rows["perturbation"] == "clean", "seconds"].iloc[0]
        cells = rows.loc[rows["level"] > 0, "seconds"].sum()
        passes = cells / clean * per_layer + 2  # every cell, the clean pass, the caches (one pass in all)
        per_image = one_thread_seconds_per_image(model)
        seconds = passes * per_image * n / args.scaling
        total += seconds
        print(f"| {model} | {cells / clean:.2f} | {per_image * 1000:.1f} ms | {seconds / 60:.0f} min |", flush=True)
    print(f"\nall models: {total / 3600:.1f} h on {args.cores} idle cores (scaling {args.scaling})")


if __name__ == "__main__":
    main()
