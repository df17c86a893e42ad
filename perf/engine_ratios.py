"""Fast engine vs the naive loop, measured in one run; prints a Markdown table of ratios.

    python perf/engine_ratios.py [--device cpu|cuda] [--images N] [--draws K]
                                       [--levels 0.5,1.0 | --levels paper] [--skip dataloader,batched]

Two workloads, every layer × the paper's three perturbations:
- ``default``: the demo's AlexNet-shaped Fashion-MNIST net (shipped weights; random if the
  Fashion-MNIST files are absent, timing is the same);
- ``alexnet224``: torchvision AlexNet at 224×224 with random weights.

Compared per workload, each through the harness's own block loop
(:meth:`lesionbench.cells.ModelRunner.block_rows`): the fast engine as it runs by default on the
device (draws batched on CUDA, one pass per cell on the CPU), the fast engine with the draws and
levels of a block batched into vmapped passes (``batch_draws = true``; a speed below 1× means
batching is slower), and (a) the naive loop with the evaluation set already in memory;
(b) the naive loop with a fresh DataLoader per cell, decoding image files each time; and the lower
bound, one forward pass over only the downstream layers per cell with nothing else (no
perturbation, no restore, no scoring) — batching can beat it. That bound leaves out work no engine
giving the same numbers can skip: one pass of the images up to the last layer (the caches, stepped
from layer to layer), and each cell's damage (its random draws, then the restore); ``unavoidable`` times those alone, and the table gives
fast over the bound plus them as well. ``--levels paper`` gives each
perturbation the paper's levels (its default levels: 0…1 by 0.1, noise 0…2 by 0.2).

Each measurement runs in a process of its own, started afresh, so the peak memory reported for
it (resident set, and on CUDA the peak allocated by torch) is that engine's alone. Times are the
measuring process's CPU seconds on the CPU (``--threads 1``: its compute time, which other jobs
on a shared machine disturb far less than wall time) and wall seconds on CUDA.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from lesionbench.cells import ModelRunner
from lesionbench.data import EvalSet
from lesionbench.evaluate import evaluate_batches, resolve_device
from lesionbench.graph import ModelGraph, split_at
from lesionbench.model_sources import LoadedModel, ModelSpec
from lesionbench.perturbation import cell_seed, generator_for, perturbed
from lesionbench.plan import Plan, PreparedModel
from lesionbench.registry import create_registry
from lesionbench.study import Study


def clock() -> float:
    """Seconds for timings: CPU time of this process on the CPU (what a shared machine's other jobs
    disturb least; ``--threads`` 1 makes it the compute time), wall time on CUDA (its kernels run
    asynchronously, and each timed section ends with a synchronize)."""
    return time.perf_counter() if torch.cuda.is_available() and CUDA_TIMING else time.process_time()


CUDA_TIMING = False  # set by measure() for --device cuda


def cells(layers, perts, levels, draws):
    """The cells evaluated: the harness scores the identity level once, as the clean model."""
    return [
        (l, p, lv, d)
        for l in layers
        for p in perts
        for lv in levels[p.name]
        if lv != p.identity_level
        for d in range(draws)
    ]


def run_harness(module, images, labels, layers, perts, levels, draws, batch, device, engine, batch_draws=None) -> float:
    """Every block of the study through ModelRunner.block_rows, as ``lesionbench run`` does it."""
    names = tuple(p.name for p in perts)
    study = Study(
        name="bench",
        models=(ModelSpec("m"),),
        perturbations=names,
        levels=levels,
        draws=draws,
        batch_size=batch,
        device=str(device),
        engine=engine,
        batch_draws=batch_draws,
    )
    loaded = LoadedModel("m", module, tuple(images.shape[1:]), lambda x: x, "")
    prepared = PreparedModel(loaded, ModelGraph.of(module, images[:1].to(device)), layers, {})
    plan = Plan(study, {p.name: (p, levels[p.name]) for p in perts}, _Raw(), None, [prepared])
    runner = ModelRunner(plan, prepared, EvalSet(images, labels, np.arange(len(labels))))
    t0 = clock()
    for block in plan.blocks(prepared):
        for _row in runner.block_rows(block):
            pass
    return clock() - t0


class _Raw:
    num_classes = 2


def run_dataloader(module, folder: Path, transform, layers, perts, levels, draws, batch, device) -> float:
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    t0 = clock()
    for layer, p, lv, d in cells(layers, perts, levels, draws):
        loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0)
        with perturbed(layer, p, lv, generator_for(cell_seed(0, "m", layer.name, p.name, lv, d))):
            batches = list(loader)
            evaluate_batches(
                lambda i, batches=batches: module(batches[i][0].to(device)), [y for _, y in batches], device
            )
    return clock() - t0


def lower_bound(module, images, batch, layers, perts, levels, draws, device) -> float:
    """Only the downstream forward passes each cell needs, inputs already cached."""
    gm = ModelGraph.of(module, images[:1].to(device)).fx
    total = 0.0
    with torch.inference_mode():
        for layer in layers:
            cut = split_at(gm, layer.name)
            prefix, suffix = cut.prefix, cut.suffix
            cached = [prefix(images[b : b + batch].to(device)) for b in range(0, len(images), batch)]
            n_cells = len(cells([layer], perts, levels, draws))
            t0 = clock()
            for _ in range(n_cells):
                for c in cached:
                    suffix(*c)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total += clock() - t0
    return total


def unavoidable(module, images, batch, layers, perts, levels, draws, device) -> float:
    """What the lower bound leaves out but no engine that gives the same numbers can skip: one pass
    of the images through everything upstream of the last layer (the engine steps each layer's
    cache from the previous layer's, so its caches cost that pass in all) and each cell's damage —
    its random draws, the same as the harness's — applied and restored, with nothing evaluated."""
    from lesionbench.perturbation import Snapshot

    gm = ModelGraph.of(module, images[:1].to(device)).fx
    total = 0.0
    with torch.inference_mode():
        prefix = split_at(gm, layers[-1].name).prefix
        t0 = clock()
        for b in range(0, len(images), batch):
            prefix(images[b : b + batch].to(device))
        total += clock() - t0
    with torch.no_grad():
        for layer in layers:
            saved = Snapshot(layer)  # once per layer, as the harness takes it once per block
            t0 = clock()
            for _, p, lv, d in cells([layer], perts, levels, draws):
                with perturbed(layer, p, lv, generator_for(cell_seed(0, "m", layer.name, p.name, lv, d)), saved=saved):
                    pass
            if device.type == "cuda":
                torch.cuda.synchronize()
            total += clock() - t0
    return total


def write_images(root: Path, images: np.ndarray) -> Path:
    """PNG files in ImageFolder layout (two classes) for the fresh-DataLoader baseline."""
    for i, img in enumerate(images):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    return root


def peak_memory_mb(device) -> tuple[float, float | None]:
    """This process's peak resident set, and on CUDA the peak memory torch allocated."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rss, (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)


TITLES = {"default": "default (fashion_alexnet, 28×28)", "alexnet224": "AlexNet 224×224 (random weights)"}


def build(name: str, args):
    """A workload's model, raw images and preprocessing; the same in every process (seeded)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if name == "default":
        from lesionbench.models.fashion import FashionAlexNet, grey_28_preprocess, weights_path

        model = FashionAlexNet()
        if weights_path("fashion_alexnet").is_file():
            model.load_state_dict(torch.load(weights_path("fashion_alexnet"), weights_only=True))
        imgs = rng.integers(0, 256, (args.images * 8, 28, 28), dtype=np.uint8)  # small images: use more
        return model, imgs, grey_28_preprocess()
    model = torchvision.models.alexnet()
    imgs = rng.integers(0, 256, (args.images, 224, 224, 3), dtype=np.uint8)
    t = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return model, imgs, t


def measure(name: str, kind: str, args) -> tuple[float, int, int, float, float | None]:
    """One engine on one workload, in this (fresh) process: seconds, cells, images, peak memory."""
    global CUDA_TIMING
    device = resolve_device(args.device)
    CUDA_TIMING = device.type == "cuda"
    torch.set_num_threads(args.threads)
    registry = create_registry()
    perts = [registry.get("perturbations", n) for n in ("synapse_knockout", "node_knockout", "weight_noise")]
    levels = {p.name: tuple(p.default_levels) if args.levels == "paper" else tuple(args.levels) for p in perts}
    module, images_u8, transform = build(name, args)
    module = module.eval().to(device)
    images = torch.stack([transform(Image.fromarray(a)) for a in images_u8])
    labels = torch.arange(len(images)) % 2
    layers = ModelGraph.of(module, images[:1].to(device)).layers
    common = (layers, perts, levels, args.draws)
    harness = (module, images, labels, *common, args.batch, device)
    if kind == "fast":  # the default for this device
        seconds = run_harness(*harness, "fast")
    elif kind == "fast_batched":
        seconds = run_harness(*harness, "fast", batch_draws=True)
    elif kind == "fast_one_by_one":
        seconds = run_harness(*harness, "fast", batch_draws=False)
    elif kind == "naive_memory":
        seconds = run_harness(*harness, "naive")
    elif kind == "naive_dataloader":
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_images(Path(tmp), images_u8)
            seconds = run_dataloader(module, folder, transform, *common, args.batch, device)
    elif kind == "unavoidable":
        seconds = unavoidable(module, images, args.batch, *common, device)
    else:
        seconds = lower_bound(module, images, args.batch, *common, device)
    return (seconds, len(cells(*common)), len(images), *peak_memory_mb(device))


def workload(name: str, args) -> tuple[str, int, int, dict, dict]:
    """Every measurement of a workload, each in a fresh process, one after another."""
    kinds = ["fast", "lower_bound", "unavoidable", "naive_memory"]
    if "batched" not in args.skip:
        kinds.append("fast_batched")
        if resolve_device(args.device).type == "cuda":  # on the CPU the default is one pass per cell already
            kinds.append("fast_one_by_one")
    if "dataloader" not in args.skip:
        kinds.append("naive_dataloader")
    timings, memory = {}, {}
    context = multiprocessing.get_context("spawn")
    for kind in kinds:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            seconds, n, n_img, rss, cuda = pool.submit(measure, name, kind, args).result()
        timings[kind], memory[kind] = seconds, (rss, cuda)
        print(f"  {name} {kind}: {seconds:.1f} s, peak RSS {rss:,.0f} MB", flush=True)
    timings.setdefault("fast_one_by_one", timings["fast"])
    return TITLES[name], n, n_img, timings, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument(
        "--levels", type=lambda s: s if s == "paper" else [float(x) for x in s.split(",")], default=[0.5, 1.0]
    )
    parser.add_argument("--only", choices=["default", "alexnet224"])
    parser.add_argument("--skip", type=lambda s: set(s.split(",")), default=set(), help="dataloader,batched")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    device = resolve_device(args.device)
    results = [workload(name, args) for name in ("default", "alexnet224") if args.only in (None, name)]
    levels = "the paper's (each perturbation's defaults)" if args.levels == "paper" else args.levels
    print(
        f"\ndevice: {device}, torch {torch.__version__}, {args.threads} threads; "
        f"levels {levels}, {args.draws} draws, batch {args.batch}\n"
    )
    gpu = device.type == "cuda"
    print(
        "| workload | cells × images | fast vs naive (memory) | fast vs naive (fresh DataLoader) "
        "| fast / lower bound | fast / (bound + prefixes + damage) | batched draws: speed vs one pass each | peak RSS: fast / naive "
        + ("| peak GPU memory: fast / naive " if gpu else "")
        + "|"
    )
    print("|---" * (9 if gpu else 8) + "|")
    for name, n, n_img, t, mem in results:
        loader = f"{t['naive_dataloader'] / t['fast']:.2f}× faster" if "naive_dataloader" in t else "—"
        batched = f"{t['fast_one_by_one'] / t['fast_batched']:.2f}×" if "fast_batched" in t else "—"
        row = (
            f"| {name} | {n} × {n_img} | {t['naive_memory'] / t['fast']:.2f}× faster | {loader} | "
            f"{t['fast'] / t['lower_bound']:.2f} | {t['fast'] / (t['lower_bound'] + t['unavoidable']):.2f} | {batched} | "
            f"{mem['fast'][0]:,.0f} / {mem['naive_memory'][0]:,.0f} MB |"
        )
        if gpu:
            row += f" {mem['fast'][1]:,.0f} / {mem['naive_memory'][1]:,.0f} MB |"
        print(row)


if __name__ == "__main__":
    main()
