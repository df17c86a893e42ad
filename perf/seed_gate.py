"""False-alarm rate of the CI gate under a plain re-run with another seed, and its power on a real
regression (issue #22).

The issue's small study: fashion_alexnet (shipped weights), layers conv1, conv3, fc6, fc8, weight_noise
and synapse_knockout at their default levels, 2 draws, 200 Fashion-MNIST test images. One run with seed
0 is the baseline; each of ``--reruns`` runs with seeds 1, 2, … is compared with it both ways
(``lesionbench compare RERUN BASE`` and ``compare BASE RERUN``): a gate with the false-alarm rate it
claims exits 0 in at least 95% of them. First, the same study of the model with Gaussian noise of std
``--noise`` × std(W) added to conv1's weights (seed 0 of numpy) must exit 1. Each result is printed as
it comes; the run directories stay under ``--out``.

    nice python perf/seed_gate.py --out /tmp/seed_gate [--reruns 20]

Needs Fashion-MNIST (``make data``). An interrupted benchmark resumes where it
stopped when started again with the same ``--out``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

STUDY = """name = "seed-gate"
models = [{{ ref = "fashion_alexnet"{checkpoint} }}]
layers = ["conv1", "conv3", "fc6", "fc8"]
perturbations = ["weight_noise", "synapse_knockout"]
draws = 2
device = "cpu"
[dataset]
name = "fashion_mnist"
n_images = 200
"""


def lesionbench(*args: str) -> int:
    exe = Path(sys.executable).with_name("lesionbench")
    return subprocess.run([str(exe), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def run(out: Path, name: str, seed: int, checkpoint: str = "") -> Path:
    study = out / f"{name}.toml"
    study.write_text(STUDY.format(checkpoint=f', checkpoint = "{checkpoint}"' if checkpoint else ""))
    target = out / name
    # --resume: starts the run there, finishes an interrupted one, or finds it complete (exit 0)
    code = lesionbench("run", str(study), "--resume", str(target), "--seed", str(seed))
    if code != 0:
        raise SystemExit(f"run {name} failed with exit status {code}")
    return target


def damaged_checkpoint(out: Path, noise: float) -> Path:
    from lesionbench.models.fashion import weights_path

    state = torch.load(weights_path("fashion_alexnet"), map_location="cpu", weights_only=True)
    key = next(k for k, v in state.items() if k.endswith("weight") and v.dim() == 4)  # conv1, the first conv
    w = state[key]
    rng = np.random.default_rng(0)
    state[key] = w + torch.as_tensor(rng.normal(0.0, noise * float(w.std()), tuple(w.shape)), dtype=w.dtype)
    path = out / f"fashion_alexnet_conv1_noise{noise:g}.pt"
    torch.save(state, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/seed_gate"))
    parser.add_argument("--reruns", type=int, default=20)
    parser.add_argument("--noise", type=float, default=1.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = run(args.out, "seed0", 0)
    damaged = run(args.out, f"conv1_noise{args.noise:g}", 0, str(damaged_checkpoint(args.out, args.noise)))
    code = lesionbench("compare", str(damaged), str(base))
    print(f"conv1 noise (std {args.noise} × std(W)): compare damaged base → {code} (1 = regression found)", flush=True)
    passed = total = 0
    for seed in range(1, args.reruns + 1):
        rerun = run(args.out, f"seed{seed}", seed)
        forward, backward = lesionbench("compare", str(rerun), str(base)), lesionbench("compare", str(base), str(rerun))
        passed += (forward == 0) + (backward == 0)
        total += 2
        print(f"seed {seed}: compare rerun base → {forward}, compare base rerun → {backward}", flush=True)
    print(
        f"false alarms: {total - passed} of {total} comparisons exit 1 ({(total - passed) / total:.1%}); "
        f"exit 0 in {passed / total:.1%}",
        flush=True,
    )


if __name__ == "__main__":
    main()
