"""Scoring the committed leaderboard with intervals: seconds for ``publish`` (read, bootstrap, render).

    python benchmarks/scoring_cost.py [--fashion-images 1000] [--imagenet-images 100] [--replicates 1000]

The committed runs (leaderboard/results/) predate per-image outcomes, so this copies them to a
temporary directory and gives every row simulated outcomes of the size a re-run will have — each
cell's images correct at its own recorded accuracy, on ``--fashion-images`` Fashion-MNIST and
``--imagenet-images`` ImageNet images — written as ``outcomes.arrow`` in the store's own format.
It then times :func:`lesionbench.publish.publish` (no plots) over all of them, with and without
the outcomes, and prints both.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lesionbench.publish import publish
from lesionbench.store import OUTCOMES, Subset, _outcome_schema, read_results

REPO = Path(__file__).resolve().parents[1]


def write_outcomes(run: Path, n: int, rng: np.random.Generator) -> int:
    import pyarrow as pa

    df = read_results(run)
    labels = np.arange(n) % int(df["num_classes"].iloc[0])
    subset = Subset(df["dataset"].iloc[0], "test", np.arange(n, dtype=np.int64), labels)
    schema = _outcome_schema(subset)
    top1 = np.where(rng.random((len(df), n)) < df["top1"].fillna(0).to_numpy()[:, None], labels, (labels + 1) % 10)
    top1 = top1.astype(np.int32)
    offsets = pa.array(np.arange(len(df) + 1, dtype=np.int32) * n)
    batch = pa.record_batch([
        pa.array(df["model"]), pa.array(df["layer"]), pa.array(df["perturbation"]), pa.array(df["level"].astype(float)),
        pa.array(df["draw"].astype(np.int64)), pa.ListArray.from_arrays(offsets, pa.array(top1.ravel())),
        pa.ListArray.from_arrays(offsets, pa.array((top1 == labels).ravel())),
    ], schema=schema)  # fmt: skip
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_batch(batch)
    (run / OUTCOMES).write_bytes(sink.getvalue())
    return len(df)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-images", type=int, default=1000)
    parser.add_argument("--imagenet-images", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "results"
        shutil.copytree(REPO / "leaderboard" / "results", copy)
        started = time.perf_counter()
        publish([copy], Path(tmp) / "plain.md", draw=False)
        plain = time.perf_counter() - started
        cells = 0
        for run in sorted(copy.iterdir()):
            n = args.imagenet_images if "imagenet" in run.name else args.fashion_images
            cells += write_outcomes(run, n, rng)
        started = time.perf_counter()
        out = publish([copy], Path(tmp) / "with.md", draw=False)
        with_ci = time.perf_counter() - started
        assert "[" in out.read_text()
    print(f"{cells} cells; publish without outcomes {plain:.1f} s; with outcomes and 1000 bootstrap replicates "
          f"{with_ci:.1f} s")


if __name__ == "__main__":
    main()
