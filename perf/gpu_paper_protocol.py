"""The paper's protocol on AlexNet at 224 px, 50,000 synthetic images, on a GPU: the table for the docs.

    python perf/gpu_paper_protocol.py [--device cuda] [--images 50000] [--size 224]
                                            [--layers all|conv1,fc6] [--draws 5] [--levels paper|0.5,1.0]
                                            [--batch 256] [--configs naive,fast,fast_batched,...]

``torchvision:alexnet`` with random weights (seed 0) on the ``synthetic`` dataset; every layer ×
the paper's three perturbations × their default levels (the paper's) × ``--draws`` draws, once per
configuration, each through ``lesionbench.run`` (nothing written):

- ``naive``: one full pass per cell;
- ``fast``: the fast engine, one pass per cell (``batch_draws = false``);
- ``fast_batched``: the fast engine with a block's draws in vmapped passes;
- ``fast_batched_cl``: the same with channels_last;
- ``fast_batched_cl_amp``: the same with autocast (float16 on CUDA, bfloat16 on the CPU).

Printed per configuration (a Markdown table): cells, the summed cell seconds (what the rows'
``seconds`` add up to: CUDA-event timed on a GPU), wall seconds of the whole run (decoding
included), image-cells per second, speed against ``naive``, the peak GPU memory torch allocated,
and the largest top-1 difference of any cell from the ``naive`` configuration. It runs on the CPU
too (``--device cpu --images 64 --layers fc8 --draws 1 --levels 0.5``: the smoke test); no
number it prints on a CPU stands for the GPU table.
"""

from __future__ import annotations

import argparse
import resource
import time

CONFIGS = {
    "naive": {"engine": "naive"},
    "fast": {"engine": "fast", "batch_draws": False},
    "fast_batched": {"engine": "fast", "batch_draws": True},
    "fast_batched_cl": {"engine": "fast", "batch_draws": True, "channels_last": True},
    "fast_batched_cl_amp": {"engine": "fast", "batch_draws": True, "channels_last": True, "autocast": True},
}
PAPER = ("synapse_knockout", "node_knockout", "weight_noise")
KEY = ["layer", "perturbation", "level", "draw"]


def study(args, config: dict) -> dict:
    mapping = {
        "name": "gpu_paper_protocol",
        "models": [{"ref": "torchvision:alexnet", "weights": "none"}],
        "dataset": {
            "name": "synthetic",
            "path": f"n={args.images},size={args.size},classes=1000",
            "n_images": args.images,
        },
        "perturbations": list(PAPER),
        "draws": args.draws,
        "seed": 0,
        "device": args.device,
        "batch_size": args.batch,
    } | config
    if args.layers != "all":
        mapping["layers"] = args.layers.split(",")
    if args.levels != "paper":
        mapping["levels"] = {p: [float(x) for x in args.levels.split(",")] for p in PAPER}
    return mapping


def measure(args, name: str):
    import torch

    import lesionbench

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    frame = lesionbench.run(study(args, CONFIGS[name]))
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return frame, wall, gpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--levels", default="paper")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (a smoke run; its numbers are not the GPU table)")
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration {unknown[0]!r}; valid: {', '.join(CONFIGS)}")
    results = {}
    for name in names:
        frame, wall, gpu = measure(args, name)
        cells = frame[frame["perturbation"] != "clean"].sort_values(KEY, ignore_index=True)
        results[name] = (cells, wall, gpu)
        print(f"  {name}: {len(cells)} cells, {cells['seconds'].sum():.1f} s in cells, {wall:.1f} s wall", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"\n{device}, torch {torch.__version__}; AlexNet (random weights) at {args.size} px, {args.images:,} "
        f"synthetic images, layers {args.layers}, levels {args.levels}, {args.draws} draws, batch {args.batch}; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB\n"
    )
    print(
        "| configuration | cells | cell seconds | wall seconds | image-cells/s | speed vs naive "
        "| peak GPU memory (MiB) | max top-1 difference vs naive |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = results.get("naive")
    for name, (cells, wall, gpu) in results.items():
        seconds = cells["seconds"].sum()
        rate = len(cells) * args.images / seconds if seconds > 0 else float("inf")
        speed = f"{base[0]['seconds'].sum() / seconds:.2f}×" if base is not None and seconds > 0 else "—"
        diff = f"{(cells['top1'] - base[0]['top1']).abs().max():.4f}" if base is not None else "—"
        print(f"| {name} | {len(cells)} | {seconds:,.1f} | {wall:,.1f} | {rate:,.0f} | {speed} | {gpu:,.0f} | {diff} |")


if __name__ == "__main__":
    main()
