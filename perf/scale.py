"""Memory and time of a study as the evaluation set grows: 1,000 / 10,000 / 50,000 synthetic images.

    python perf/scale.py [--images 1000,10000] [--engines fast,naive,bound] [--layers conv2,fc6]
                               [--size 224] [--batch 100] [--threads 1] [--budget 1G] [--out DIR] [--table FILE]

An AlexNet-shaped network (``torchvision:alexnet``, random weights, seed 0) on the ``synthetic``
dataset at ``--size`` px, ``synapse_knockout`` at level 0.5, one draw per layer: a few cells and
the clean pass. ``fast`` and ``naive`` run ``lesionbench run --no-publish`` in a process of its
own under ``/usr/bin/time -v`` (peak RSS and CPU time of the whole process: decoding, the clean
pass, the cells); ``bound`` times, in a process of its own, only the forward passes downstream of
each layer on the same images (one per cell, the layer's input computed beforehand and not
timed) — what no engine can beat. Printed per run: peak RSS, CPU seconds, CPU seconds per
image-cell (the whole process's CPU over images × (cells + clean)), and the mean cell time per
image from results.csv. A line per finished run is appended to ``--table`` as it ends, so a long
run that is stopped keeps what finished.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

MODEL = "torchvision:alexnet"


def run_study(n: int, engine: str, args, out: Path) -> dict:
    """``lesionbench run`` under ``/usr/bin/time -v``: peak RSS (MiB) and CPU seconds."""
    run_dir = out / f"{engine}-{n}"
    command = [
        sys.executable,
        "-m",
        "lesionbench.cli",
        "run",
        "--models",
        MODEL,
        "--dataset",
        "synthetic",
        "--data",
        f"n={n},size={args.size},classes=1000",
        "--n-images",
        str(n),
        "--layers",
        args.layers,
        "--perturbations",
        "synapse_knockout",
        "--levels",
        "0.5",
        "--draws",
        "1",
        "--seed",
        "0",
        "--engine",
        engine,
        "--batch-size",
        str(args.batch),
        "--device",
        "cpu",
        "--no-publish",
        "--out",
        str(run_dir),
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.budget:
        env["LESIONBENCH_MEMORY_BUDGET"] = args.budget
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    if done.returncode not in (0, 3):  # 3: finished, the random-weight net not scored (at chance)
        raise SystemExit(f"{engine} at {n} images failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", done.stderr).group(1))
    system = float(re.search(r"System time \(seconds\): ([\d.]+)", done.stderr).group(1))
    with open(run_dir / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["perturbation"] != "clean"]
    cell_seconds = sum(float(r["seconds"]) for r in rows)
    return {"rss_mib": rss, "cpu_s": user + system, "cells": len(rows), "cell_s": cell_seconds}


def bound(n: int, args) -> dict:
    """In a fresh process: only the downstream passes, one per cell, inputs computed untimed."""
    import resource

    import torch
    import torchvision

    from lesionbench.graph import ModelGraph
    from lesionbench.models.torchvision_models import (
        ALEXNET_ALIASES,
        IMAGENET_MEAN,
        IMAGENET_STD,
        imagenet_eval_transform,
    )
    from lesionbench.pixels import normalise, split_normalisation
    from lesionbench.plugins.synthetic import synthetic_image

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    to_uint8 = split_normalisation(imagenet_eval_transform())[0]
    first = normalise(to_uint8(synthetic_image(0, args.size, 1000))[None], IMAGENET_MEAN, IMAGENET_STD)
    graph = ModelGraph.of(model, first, ALEXNET_ALIASES)
    names = {layer.display: layer for layer in graph.layers}
    layers = [names[name] for name in args.layers.split(",")]
    splits = [graph.split(layer) for layer in layers]
    spent = 0.0
    with torch.inference_mode():
        for b in range(0, n, args.batch):
            pixels = torch.stack(
                [to_uint8(synthetic_image(i, args.size, 1000)) for i in range(b, min(n, b + args.batch))]
            )
            x = normalise(pixels, IMAGENET_MEAN, IMAGENET_STD)
            for cut in splits:
                values = cut.prefix(x)
                t0 = time.process_time()
                cut.suffix(*values)
                spent += time.process_time() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_mib": rss, "cpu_s": spent, "cells": len(layers), "cell_s": spent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="1000,10000", help="comma-separated image counts")
    parser.add_argument("--engines", default="fast,naive,bound")
    parser.add_argument("--layers", default="conv2,fc6", help="AlexNet layers (one cell each)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--budget", help="LESIONBENCH_MEMORY_BUDGET for the runs, e.g. 1G (default: from available memory)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/scale"))
    parser.add_argument("--table", type=Path, help="append each finished run's line here (default: OUT/scale.md)")
    parser.add_argument("--bound-only", type=int, help=argparse.SUPPRESS)  # the bound's own process
    args = parser.parse_args()
    if args.bound_only:
        print(repr(bound(args.bound_only, args)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.table or args.out / "scale.md"
    if not table.exists():
        table.write_text(
            "| images | engine | layers | peak RSS (MiB) | CPU s | CPU ms per image-cell | cell ms per image |\n"
            "|---|---|---|---|---|---|---|\n"
        )
    for n in (int(x) for x in args.images.split(",")):
        for engine in args.engines.split(","):
            if engine == "bound":
                cmd = [
                    sys.executable,
                    __file__,
                    "--bound-only",
                    str(n),
                    "--layers",
                    args.layers,
                    "--size",
                    str(args.size),
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(args.threads),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                r = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 (our own child's repr of a dict)
                per = r["cpu_s"] / (n * r["cells"])
            else:
                r = run_study(n, engine, args, args.out)
                per = r["cpu_s"] / (n * (r["cells"] + 1))
            line = (
                f"| {n:,} | {engine} | {args.layers} | {r['rss_mib']:,.0f} | {r['cpu_s']:,.1f} | {1000 * per:.2f} | "
                f"{1000 * r['cell_s'] / (n * r['cells']):.2f} |"
            )
            print(line, flush=True)
            with open(table, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
