"""Super-weight probe (Yu et al. 2024, *The Super Weight in Large Language Models*).

Yu et al. find single weights (in an early ``mlp.down_proj``) whose removal destroys an LLM, and
that they are among the largest in magnitude. This probe zeroes the k weights of largest |w| of
a layer (its ``weight`` only; ties broken by position, as ``torch.topk`` does): level k = 0, 1, 2,
4, …, 64. A layer whose retention falls at k = 1 or 2 holds a super weight. Deterministic (one
draw per level); any Conv/Linear (and transformers ``Conv1D``) layer.
"""

from __future__ import annotations

from lesionbench import LesionbenchError, LevelAxis, WeightPerturbation, hookimpl

LEVELS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class SuperWeight(WeightPerturbation):
    def check_level(self, level):
        if level != int(level):
            raise LesionbenchError(f"super_weight levels are weight counts k (whole numbers), got {level}")

    def apply(self, layer, level, generator):
        weight = layer.module.weight
        k = min(int(level), weight.numel())
        if k:
            flat = weight.view(-1)
            flat[flat.abs().topk(k).indices] = 0


@hookimpl
def lesionbench_perturbations():
    return [
        SuperWeight(
            name="super_weight",
            description="Zero the k largest-magnitude weights of the layer (the super-weight probe of Yu et al. 2024).",
            default_levels=LEVELS,
            level_range=(0.0, 1.0e9),
            axis=LevelAxis("k largest-|w| weights zeroed"),
            deterministic=True,
        )
    ]
