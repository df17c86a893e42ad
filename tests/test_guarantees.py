"""Failures inside a study stay inside their cell: a raising perturbation, NaN logits, Ctrl-C."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import write_fashion
from lesionbench.executors.local import execute
from lesionbench.perturbation import WeightPerturbation, generator_for, model_checksum, perturbed
from lesionbench.plan import prepare
from lesionbench.registry import create_registry
from lesionbench.store import RunDir
from lesionbench.study import parse_study


class Exploding(WeightPerturbation):
    """Raises on every non-identity level, after damaging the layer."""

    def apply(self, layer, level, generator):
        layer.module.weight.mul_(0)
        raise RuntimeError("plugin bug")


class Poisoning(WeightPerturbation):
    """Makes the layer emit NaN."""

    def apply(self, layer, level, generator):
        layer.module.weight.fill_(float("nan"))


class Plugin:
    from lesionbench.hookspecs import hookimpl

    @hookimpl
    def lesionbench_perturbations(self):
        return [
            Exploding("exploding", "raises", (0.0, 1.0), (0.0, 1.0)),
            Poisoning("poisoning", "NaN weights", (0.0, 1.0), (0.0, 1.0)),
        ]


@pytest.fixture
def plan(tmp_path):
    registry = create_registry()
    registry.register(Plugin(), name="faulty")
    data = write_fashion(tmp_path / "fashion", n=20)
    study = parse_study(
        {
            "name": "faulty",
            "models": [{"ref": "fashion_alexnet", "weights": "none"}],
            "layers": ["conv2", "fc7"],
            "perturbations": ["exploding", "poisoning", "weight_noise"],
            "levels": {"weight_noise": [0.0, 1.0]},
            "draws": 2,
            "device": "cpu",
            "dataset": {"name": "fashion_mnist", "path": str(data), "n_images": 20},
        }
    )
    return prepare(study, registry)


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_a_raising_perturbation_fails_its_own_cells_and_the_study_goes_on(plan, tmp_path, engine):
    from dataclasses import replace

    plan.study = replace(plan.study, engine=engine)
    module = plan.models[0].loaded.module
    before = model_checksum(module)
    run = RunDir.create(tmp_path / "run", plan.study.to_dict(), plan.fingerprint())
    execute(plan, run, debug=True)  # debug: checksum verified after every cell
    df = run.frame()
    exploding = df[(df["perturbation"] == "exploding") & (df["level"] == 1.0)]
    assert len(exploding) == 4 and (exploding["error"] == "RuntimeError: plugin bug").all()
    assert exploding["top1"].isna().all()
    log = (tmp_path / "run" / "run.log").read_text()  # the traceback of each failed cell, for the plugin's author
    assert log.count("exploding 1 #0 failed:\nTraceback") == 2 and 'raise RuntimeError("plugin bug")' in log
    poisoned = df[(df["perturbation"] == "poisoning") & (df["level"] == 1.0)]
    assert len(poisoned) == 4 and (poisoned["error"] == "non-finite logits").all()
    assert poisoned["loss"].isna().all() and (poisoned["top1"] == 0).all()  # NaN logits: no image right
    noise = df[(df["perturbation"] == "weight_noise") & (df["level"] == 1.0)]
    assert len(noise) == 4 and (noise["error"] == "").all() and noise["top1"].notna().all()
    assert model_checksum(module) == before


def test_ctrl_c_inside_a_perturbation_still_restores_the_layer(plan):
    layer = plan.models[0].layers[0]
    module = plan.models[0].loaded.module
    before = model_checksum(module)
    noise = create_registry().get("perturbations", "weight_noise")
    with pytest.raises(KeyboardInterrupt):
        with perturbed(layer, noise, 2.0, generator_for(0)):
            assert model_checksum(module) != before
            raise KeyboardInterrupt
    assert model_checksum(module) == before
    assert torch.isfinite(layer.module.weight).all()


def test_results_do_not_depend_on_the_order_cells_run_in(plan, tmp_path):
    """Each cell's randomness comes from what the cell is, not from what ran before it."""
    key = ["layer", "perturbation", "level", "draw"]
    numbers = ["top1", "top5", "loss", "seed"]
    plan.perturbations = {k: v for k, v in plan.perturbations.items() if k == "weight_noise"}
    plan.perturbations["synapse_knockout"] = (create_registry().get("perturbations", "synapse_knockout"), (0.0, 0.5))
    study = plan.study.to_dict() | {"perturbations": list(plan.perturbations)}  # the manifest names what runs
    first = RunDir.create(tmp_path / "forward", study, plan.fingerprint())
    execute(plan, first)
    plan.models[0].layers.reverse()
    plan.perturbations = dict(reversed(plan.perturbations.items()))
    second = RunDir.create(tmp_path / "reversed", study, plan.fingerprint())
    execute(plan, second)
    a = first.frame().sort_values(key, ignore_index=True)
    b = second.frame().sort_values(key, ignore_index=True)
    assert list(first.frame()["layer"][1:3]) != list(second.frame()["layer"][1:3])  # really another order
    assert a[key + numbers].equals(b[key + numbers])


def test_an_image_with_non_finite_logits_counts_as_wrong_and_the_others_as_measured():
    """A transient fault can make some images' logits NaN/Inf and leave the rest: top-1/top-5 count
    those images wrong (whatever argmax would say of a NaN), their recorded class is no class."""
    from lesionbench.evaluate import NO_PREDICTION, evaluate_batches

    labels = torch.tensor([0, 1, 2, 3])
    logits = torch.nn.functional.one_hot(labels, 10).float() * 5  # every image right
    logits[1, 1] = float("nan")  # argmax of a NaN picks the NaN, which here is the label
    logits[2, 7] = float("inf")
    result = evaluate_batches(lambda i: logits, [labels], torch.device("cpu"))
    assert result.top1 == 0.5 and result.top5 == 0.5 and math.isnan(result.loss)
    assert result.predictions.tolist() == [0, NO_PREDICTION, NO_PREDICTION, 3]
    assert result.top5_hit.tolist() == [True, False, False, True]
