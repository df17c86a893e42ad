"""The timm CNN zoo through the fast engine: does every family give the naive loop's numbers?

    python perf/zoo_survey.py [--only resnet18d,vgg11] [--images 8] [--layers 6] [--threads 2]

For each family of :data:`ZOO` (the smallest timm variant, random weights, a small input where the
architecture allows one) the script runs ``--layers`` layers spread evenly over the network's depth
(the study option ``layer_count``) × the paper's three perturbations at one level each, one draw,
on ``--images`` random images, once with the fast engine and once with the naive one, through
:func:`lesionbench.api.run` into run directories (so the engine's notes are the ``run.log`` a user
would read). Every layer of the network (not only those) is also cut into prefix and suffix, and
``suffix(*prefix(x)) == model(x)`` checked exactly. It prints a Markdown table, one row per
model: layers the fast engine can cut (of which exact), cells, fast/naive time (CPU time of
this process for the whole run — graph, trace, caches, cells — which other jobs on a shared
machine disturb less than wall time), the largest relative difference in loss and whether top-1
agrees everywhere, and what the fast engine said in ``run.log`` (fell back to full passes, and why).

Random weights are made non-trivial first (:func:`nonzero_init`): timm zero-initialises the last
norm or conv of many residual branches, and layer-scale / skip-init gains start at 0 or 1e-6; with
those left as they are, a damaged layer inside such a branch changes nothing in either engine and
fast = naive would prove nothing. Every norm's scale and shift, every all-zero or near-zero
weight, and every gain is redrawn, then the BatchNorm statistics are estimated on the images.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import traceback
from pathlib import Path

import timm
import torch
from torch import nn

from lesionbench.api import run
from lesionbench.graph import ModelGraph

# family, smallest timm variant, builder options, input side (pixels)
ZOO: list[tuple[str, str, dict, int]] = [
    ("ResNet", "resnet10t", {}, 64),
    ("ResNet-D", "resnet18d", {}, 64),
    ("ResNeXt", "resnext26ts", {}, 64),
    ("RegNet", "regnetx_002", {}, 64),
    ("ConvNeXt", "convnext_atto", {}, 64),
    ("EfficientNet", "efficientnet_b0", {}, 64),
    ("EfficientNet-Lite (TF SAME)", "tf_efficientnet_lite0", {}, 64),
    ("MobileNetV2", "mobilenetv2_050", {}, 64),
    ("MobileNetV3", "mobilenetv3_small_050", {}, 64),
    ("DenseNet", "densenet121", {}, 64),
    ("GhostNet", "ghostnet_050", {}, 64),
    ("ReXNet", "rexnet_100", {}, 64),
    ("MixNet", "mixnet_s", {}, 64),
    ("DLA", "dla46_c", {}, 64),
    ("DPN", "dpn48b", {}, 64),
    ("HRNet", "hrnet_w18_small", {}, 64),
    ("Inception-v3", "inception_v3", {}, 96),
    ("Xception", "xception41", {}, 64),
    ("NFNet", "nf_regnet_b0", {}, 64),
    ("RepVGG", "repvgg_a0", {}, 64),
    ("Res2Net", "res2net50_14w_8s", {}, 64),
    ("SKNet", "skresnet18", {}, 64),
    ("SelecSLS", "selecsls42b", {}, 64),
    ("CSPNet", "cs3darknet_focus_s", {}, 64),
    ("ResNeSt", "resnest14d", {}, 64),
    ("VGG", "vgg11", {}, 64),
    ("LCNet", "lcnet_035", {}, 64),
    ("TinyNet", "tinynet_e", {}, 64),
    ("FBNet", "fbnetc_100", {}, 64),
    ("MNASNet", "mnasnet_small", {}, 64),
    ("VoVNet", "ese_vovnet19b_slim_dw", {}, 64),
    ("GENet", "gernet_s", {}, 64),
    ("ResNetV2", "resnetv2_18", {}, 64),
    ("MobileViT", "mobilevit_xxs", {}, 64),
    ("EfficientViT (MIT)", "efficientvit_b0", {}, 64),
    ("EfficientViT (MSRA)", "efficientvit_m0", {"img_size": 64}, 64),
    ("FastViT", "fastvit_t8", {}, 64),
    ("MobileOne", "mobileone_s0", {}, 64),
    ("EdgeNeXt", "edgenext_xx_small", {}, 64),
    ("RepGhost", "repghostnet_050", {}, 64),
    ("HGNetV2", "hgnetv2_b0", {}, 64),
    ("TResNet", "tresnet_m", {}, 64),
    ("ViT", "vit_tiny_patch16_224", {"img_size": 64}, 64),
    ("DeiT", "deit_tiny_patch16_224", {"img_size": 64}, 64),
    ("LeViT", "levit_128s", {"img_size": 64}, 64),
]
LEVELS = {"synapse_knockout": [0.0, 0.5], "node_knockout": [0.0, 0.5], "weight_noise": [0.0, 1.0]}
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def nonzero_init(model: nn.Module, images: torch.Tensor, seed: int) -> nn.Module:
    """Random weights with no silent branch: norms' scale ~ U(0.5, 1.5) and shift ~ N(0, 0.1²);
    weights that are all (near) zero ~ N(0, 1/fan_in); every other parameter that is near zero
    or constant (layer-scale gammas, skip-init gains) ~ U(0.5, 1); then BatchNorm running
    statistics estimated on ``images`` (a cumulative average over one pass in train mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NORMS) and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
        norm_params = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
        for name, p in model.named_parameters():
            if id(p) in norm_params or not p.is_floating_point() or p.numel() == 0:
                continue
            small = p.abs().max() < 1e-3
            if p.dim() >= 2 and small:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif (
                p.dim() < 2
                and not name.endswith("bias")
                and (small or p.numel() > 1 and bool((p == p.flatten()[0]).all()))
            ):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
        batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in batchnorms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model(images)
        model.eval()
    return model


def _notes(out: Path) -> list[str]:
    log = out / "run.log"
    return [line.strip() for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def every_cut(model: nn.Module, images: torch.Tensor) -> tuple[int, int, list[str]]:
    """Every layer (not only the surveyed ones): how many the fast engine can cut, at how many of
    those ``suffix(*prefix(x))`` equals ``model(x)`` exactly, and the layers left to full passes."""
    graph = ModelGraph.of(model, images[:1])
    with torch.inference_mode():
        reference = model(images)
        cut, exact, uncut = 0, 0, []
        for layer in graph.layers:
            parts = graph.split(layer)
            if parts is None:
                uncut.append(layer.name)
                continue
            cut += 1
            exact += bool(torch.equal(parts.suffix(*parts.prefix(images)), reference))
    return cut, exact, uncut


def survey(family: str, name: str, kwargs: dict, side: int, n_images: int, layers: int, root: Path) -> dict:
    torch.manual_seed(0)
    images = torch.randn(n_images, 3, side, side)
    labels = torch.arange(n_images) % 10
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    nonzero_init(model, images, seed=0)
    row = {"family": family, "model": name, "params": sum(p.numel() for p in model.parameters()), "side": side}
    results, seconds, notes = {}, {}, {}
    for engine in ("fast", "naive"):
        out = root / f"{name}-{engine}"
        start = time.process_time()
        study = {
            "perturbations": list(LEVELS),
            "levels": LEVELS,
            "draws": 1,
            "layer_count": layers,
            "seed": 0,
            "engine": engine,
            "batch_size": n_images,
            "device": "cpu",
        }
        results[engine] = run(study, out=out, model=model, data=(images, labels))
        seconds[engine] = time.process_time() - start
        notes[engine] = _notes(out)
    key = ["layer", "perturbation", "level", "draw"]
    fast = results["fast"].set_index(key).sort_index()
    naive = results["naive"].set_index(key).sort_index()
    damaged = fast.index.get_level_values("level") != 0.0  # the identity level is the clean row again
    rel = ((fast["loss"] - naive["loss"]).abs() / naive["loss"].abs().clip(lower=1e-12)).max()
    clean = naive.xs("clean", level="perturbation")["loss"].iloc[0]
    moved = (naive.loc[damaged, "loss"] - clean).abs().max()
    cut, exact, uncut = every_cut(model, images)
    row.update(
        cut=cut,
        exact=exact,
        uncut=uncut,
        cells=int(damaged.sum()),
        ratio=seconds["fast"] / seconds["naive"],
        rel_loss=float(rel),
        top1_equal=bool((fast["top1"] == naive["top1"]).all()),
        damage_moves_loss=float(moved),
        # the engine's notes (random weights put every model at chance, which run.log also says)
        fast_notes=[n for n in notes["fast"] if " left out: " not in n and "is at chance" not in n],
        left_out=sum(" left out: " in n for n in notes["fast"]),
        layers=sorted(set(fast.index.get_level_values("layer")) - {""}),
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated timm names")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    print(
        "| family | timm model | params | input | layers cut (exact) | cells | fast/naive time | max rel. loss diff | "
        "top-1 equal | fast engine's run.log |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="zoo-survey-") as tmp:
        for family, name, kwargs, side in ZOO:
            if only and name not in only:
                continue
            try:
                r = survey(family, name, kwargs, side, args.images, args.layers, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a crash is a finding of the survey
                first = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                print(f"| {family} | `{name}` | | {side}² | | | | | | **crashed**: {first} |", flush=True)
                traceback.print_exc()
                continue
            said = "; ".join(n.split(": ", 1)[-1] for n in r["fast_notes"]) or "cached suffix for every layer"
            if r["damage_moves_loss"] == 0:
                said += " (WARNING: damage never moved the loss)"
            total = r["cut"] + len(r["uncut"])
            cuts = f"{r['cut']}/{total}" + ("" if r["exact"] == r["cut"] else f" (**{r['cut'] - r['exact']} differ**)")
            if r["uncut"]:
                cuts += f"; full passes: {', '.join(r['uncut'][:3])}{' …' if len(r['uncut']) > 3 else ''}"
            print(
                f"| {family} | `{name}` | {r['params'] / 1e6:.1f}M | {side}² | {cuts} | {r['cells']} | "
                f"{r['ratio']:.2f} | {r['rel_loss']:.1e} | {'yes' if r['top1_equal'] else '**no**'} | {said} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
