"""What per-image outcomes cost the demo, measured inside one ``lesionbench run demo``.

    python perf/outcome_cost.py [--out runs/outcome-cost] [--threads N]

Runs the demo through the command line's own entry point (``lesionbench run demo --out DIR``: the
study, the end-of-run summary, the leaderboard and its plots) in this process, with timers around
everything outcomes added:

- writing them: :class:`lesionbench.store._OutcomeWriter` (Arrow batch, lz4, fsync) per cell;
- the runner's bookkeeping: :meth:`lesionbench.cells.ModelRunner.with_outcomes` (flip rate, padding);
- keeping them during evaluation: per batch, the top-1 classes and top-5 hits copied to the CPU
  (timed apart on batches of the demo's shape, times the number of batches evaluated);
- scoring with them when the leaderboard is published: reading ``outcomes.arrow`` and the
  bootstrap (:func:`lesionbench.leaderboard.track_bootstraps`).

Prints each as seconds and as a share of the run's wall time.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch

import lesionbench.cells as cells
import lesionbench.publish as publish
import lesionbench.store as store
from lesionbench.cli import main as cli

spent: dict[str, float] = {
    "writing outcomes.arrow": 0.0,
    "runner bookkeeping": 0.0,
    "reading outcomes": 0.0,
    "bootstrap (1000 replicates)": 0.0,
}


def timed(owner, name: str, key: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def collection_seconds_per_batch(batch: int = 256, classes: int = 10, repeats: int = 2000) -> float:
    """What evaluate_batches does per batch to keep per-image outcomes, on the demo's shapes."""
    logits = torch.randn(1, batch, classes)
    y = torch.randint(0, classes, (batch,))
    top = logits.topk(5, dim=-1).indices
    hit = top == y[None, :, None]
    any5 = hit.any(dim=-1)
    t = time.perf_counter()
    kept1, kept5 = [], []
    for _ in range(repeats):
        kept1.append(top[..., 0].to(torch.int32).cpu())
        kept5.append(any5.cpu())
    torch.cat(kept1, dim=1).numpy(), torch.cat(kept5, dim=1).numpy()
    return (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/outcome-cost"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--run-args", default="", help="further `lesionbench run` flags, e.g. '--n-images 20 --draws 1'"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    timed(store._OutcomeWriter, "append", "writing outcomes.arrow")
    timed(cells.ModelRunner, "with_outcomes", "runner bookkeeping")
    timed(publish, "read_results_with_outcomes", "reading outcomes")
    timed(publish, "track_bootstraps", "bootstrap (1000 replicates)")
    started = time.perf_counter()
    assert cli(["run", "demo", "--out", str(args.out), *args.run_args.split()]) in (0, 3)  # 3: not scored
    wall = time.perf_counter() - started
    df = store.read_results(args.out)
    batches = int(sum(math.ceil(n / 256) for n in df["n_images"]))
    spent["keeping them in evaluate_batches"] = batches * collection_seconds_per_batch()
    # reading the results table itself was there before: count only what the outcomes add
    t = time.perf_counter()
    store.read_results(args.out)
    spent["reading outcomes"] = max(0.0, spent["reading outcomes"] - (time.perf_counter() - t))
    print(
        f"\nlesionbench run demo: {wall:.1f} s wall, {len(df)} cells, outcomes.arrow "
        f"{(args.out / store.OUTCOMES).stat().st_size / 1e6:.2f} MB\n"
    )
    print("| what | seconds | share of the wall time |\n|---|---|---|")
    for what, s in spent.items():
        print(f"| {what} | {s:.2f} | {s / wall:.2%} |")
    total = sum(spent.values())
    print(f"| **all of it** | **{total:.2f}** | **{total / wall:.2%}** |")


if __name__ == "__main__":
    main()
