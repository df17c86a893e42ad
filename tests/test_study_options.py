"""Harness features plugins beyond the paper rely on: BatchNorm recalibration, non-finite weight
counts, one draw for deterministic perturbations, a plugin's own level check, an init checkpoint,
and a layer axis of a perturbation's own (stages for block removal)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import write_fashion
from lesionbench.cells import recalibrate
from lesionbench.cli import main
from lesionbench.executors.local import execute
from lesionbench.hookspecs import hookimpl
from lesionbench.perturbation import WeightPerturbation
from lesionbench.plan import BN_SUFFIX, calibration_subset, prepare
from lesionbench.registry import create_registry
from lesionbench.store import NONFINITE, RunDir, read_results
from lesionbench.study import parse_study

KEY = ["layer", "perturbation", "level", "draw"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fm") / "fashion", n=80)


def study(data, **extra):
    base = {
        "name": "s",
        "models": [{"ref": "fashion_resnet"}],
        "layers": ["conv1.0", "layer2.0.conv1"],
        "perturbations": ["synapse_knockout"],
        "levels": {"synapse_knockout": [0.0, 0.7]},
        "draws": 2,
        "device": "cpu",
        "batch_size": 16,
        "dataset": {"name": "fashion_mnist", "path": str(data), "n_images": 30},
    }
    return parse_study(base | extra)


def run(s, tmp_path, name, registry=None):
    plan = prepare(s, registry or create_registry())
    out = RunDir.create(tmp_path / name, s.to_dict(), plan.fingerprint())
    execute(plan, out, debug=True)  # debug: checksum after every cell
    return out.frame().sort_values(KEY, ignore_index=True)


def test_recalibrate_reestimates_batchnorm_statistics_as_a_plain_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    images = torch.randn(20, 1, 8, 8)
    recalibrate(model, [model[1]], images, batch_size=10, device=torch.device("cpu"))
    with torch.no_grad():
        features = model[0](images)
    assert torch.allclose(model[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-6)
    assert not model[1].training and model[1].momentum == 0.1  # left as it was found


def test_bn_recalibrate_is_a_condition_of_its_own_and_leaves_the_model_as_it_was(data, tmp_path):
    plain = run(study(data), tmp_path, "plain")
    recal = run(study(data, bn_recalibrate=True, calibration_images=40), tmp_path, "recal")
    damaged = recal[(recal["level"] > 0)]
    assert set(damaged["perturbation"]) == {"synapse_knockout" + BN_SUFFIX}
    assert (
        recal.loc[recal["perturbation"] == "clean", "top1"].to_numpy()
        == plain.loc[plain["perturbation"] == "clean", "top1"].to_numpy()
    ).all()
    a = plain[plain["level"] > 0]["loss"].to_numpy()
    assert not (abs(a - damaged["loss"].to_numpy()) < 1e-9).all()  # the statistics really were re-estimated
    assert read_results(tmp_path / "recal")["perturbation"].str.endswith(BN_SUFFIX).sum() == len(damaged) + 2


def test_calibration_images_are_disjoint_from_the_evaluated_ones_and_must_exist(data):
    import numpy as np

    s = study(data, bn_recalibrate=True, calibration_images=40)
    plan = prepare(s, create_registry())
    assert len(plan.calibration) == 40 and not set(plan.calibration) & set(plan.indices)
    assert len(np.unique(plan.calibration)) == 40
    with pytest.raises(Exception, match="bn_recalibrate needs 60 images"):
        calibration_subset(np.arange(80) % 10, plan.indices, study(data, bn_recalibrate=True, calibration_images=60))


class Poison(WeightPerturbation):
    """Sets exactly three weights to NaN/Inf: the run must count them."""

    def apply(self, layer, level, generator):
        flat = layer.module.weight.view(-1)
        flat[:2] = float("nan")
        flat[2] = float("inf")


def test_nonfinite_weights_are_counted_per_cell(data, tmp_path):
    registry = create_registry(
        [
            (
                "poison",
                SimpleNamespace(
                    lesionbench_perturbations=hookimpl(
                        lambda: [Poison("poison", "three weights NaN/Inf", (0.0, 1.0), (0.0, 1.0))]
                    )
                ),
            )
        ]
    )
    s = study(
        data,
        perturbations=["poison"],
        levels={"poison": [0.0, 1.0]},
        models=[{"ref": "fashion_alexnet"}],
        layers=["conv2"],
    )
    df = run(s, tmp_path, "poison", registry)
    hit = df[df["level"] == 1.0]
    assert (hit["nonfinite_weights"] == 3).all() and (hit["error"] == NONFINITE).all()
    assert (df.loc[(df["level"] == 0.0) & (df["perturbation"] == "poison"), "nonfinite_weights"] == 0).all()


def test_deterministic_perturbations_get_one_draw_per_level(data, tmp_path):
    s = study(data, perturbations=["quantize"], levels={"quantize": [8.0, 2.0]}, draws=3)
    df = run(s, tmp_path, "q")
    assert df.groupby(["layer", "level"]).size().eq(1).all() and len(df) == 1 + 2 * 2
    assert set(df.loc[df["perturbation"] == "quantize", "level_axis"]) == {"descending"}


def refused_before_writing(spec_text: str, data, tmp_path, capsys) -> str:
    """Run a study on the test data: it must exit 2 with one line, leaving no run directory."""
    spec = tmp_path / "s.toml"
    spec.write_text(f'{spec_text}[dataset]\nname = "fashion_mnist"\npath = "{data}"\n')
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    return err


def test_a_plugins_own_level_rule_is_checked_before_anything_is_written(data, tmp_path, capsys):
    spec = 'models = ["fashion_alexnet"]\nperturbations = ["quantize"]\n[levels]\nquantize = [8, 2.5]\n'
    assert "whole number of bits" in refused_before_writing(spec, data, tmp_path, capsys)


def test_reinit_without_initial_weights_stops_before_anything_is_written(data, tmp_path, capsys):
    spec = 'models = [{ref = "fashion_alexnet", weights = "none"}]\nperturbations = ["reinit"]\n'
    assert "does not know its initial weights" in refused_before_writing(spec, data, tmp_path, capsys)


def test_init_checkpoint_gives_reinit_its_initial_weights(data, tmp_path, capsys):
    from lesionbench.models.fashion import ARCHITECTURES

    torch.manual_seed(123)
    init = ARCHITECTURES["fashion_alexnet"]().state_dict()
    torch.save(init, tmp_path / "init.pt")
    s = study(
        data,
        models=[{"ref": "fashion_alexnet", "init_checkpoint": str(tmp_path / "init.pt")}],
        layers=["conv1"],
        perturbations=["reinit"],
        levels={"reinit": [0.0, 1.0]},
        draws=1,
    )
    plan = prepare(s, create_registry())
    layer = plan.models[0].layers[0]
    assert torch.equal(layer.initial["weight"], init["conv1.weight"])
    df = run(s, tmp_path, "reinit")
    assert df.loc[df["level"] == 1.0, "error"].item() == ""
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'models = [{{ref = "fashion_alexnet", init_checkpoint = "bad.pt"}}]\n'
        f'[dataset]\nname = "fashion_mnist"\npath = "{data}"\n'
    )
    assert main(["run", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert "does not fit model" in capsys.readouterr().err


def test_block_removal_runs_on_stages_and_both_engines_agree(data, tmp_path):
    base = dict(
        models=[{"ref": "fashion_mobilenetv3"}],
        layers=[],
        perturbations=["block_removal"],
        levels={"block_removal": [0.0, 0.5, 1.0]},
    )
    fast = run(study(data, **base), tmp_path, "fast")
    naive = run(study(data, engine="naive", **base), tmp_path, "naive")
    stages = set(fast.loc[fast["perturbation"] == "block_removal", "layer"])
    assert stages and all(s.startswith("blocks.") and s.count(".") == 1 for s in stages)
    assert fast.loc[fast["level"] == 1.0, "top1"].nunique() > 1 or fast.loc[fast["level"] == 1.0, "loss"].nunique() > 1
    pd.testing.assert_frame_equal(fast[KEY + ["top1", "loss"]], naive[KEY + ["top1", "loss"]], rtol=1e-6)
