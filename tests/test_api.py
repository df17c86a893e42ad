"""The Python API: ``run``, ``lesioned``, ``load_results`` and the score functions, as a notebook uses them."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lesionbench
from conftest import FINISHED, write_fashion
from lesionbench.cli import main
from lesionbench.errors import LesionbenchError
from lesionbench.perturbation import model_checksum

KEY = ["model", "layer", "perturbation", "level", "draw"]
NUMBERS = ["seed", "top1", "top5", "loss", "n_images", "layer_index", "relative_depth"]


def small_study(data) -> dict:
    return {
        "name": "api",
        "models": [{"ref": "fashion_alexnet"}],
        "layers": ["conv1", "fc8"],
        "perturbations": ["synapse_knockout", "node_knockout"],
        "levels": {"synapse_knockout": [0.0, 0.5], "node_knockout": [0.0, 0.5]},
        "draws": 2,
        "device": "cpu",
        "dataset": {"name": "fashion_mnist", "path": str(data), "n_images": 40},
    }


def test_run_in_memory_gives_the_rows_of_the_cli_and_writes_nothing(tmp_path, monkeypatch):
    data = write_fashion(tmp_path / "fashion", n=60)
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    df = lesionbench.run(small_study(data))
    assert set(os.listdir(tmp_path)) == before  # in memory: nothing written
    assert len(df) == 1 + 2 * 2 * (1 + 2)

    study = tmp_path / "study.toml"
    study.write_text(
        'name = "api"\nmodels = ["fashion_alexnet"]\nlayers = ["conv1", "fc8"]\n'
        'perturbations = ["synapse_knockout", "node_knockout"]\ndraws = 2\ndevice = "cpu"\n'
        f"[levels]\nsynapse_knockout = [0.0, 0.5]\nnode_knockout = [0.0, 0.5]\n"
        f'[dataset]\nname = "fashion_mnist"\npath = "{data}"\nn_images = 40\n'
    )
    assert main(["run", str(study), "--out", str(tmp_path / "cli"), "--no-publish"]) in FINISHED
    cli = lesionbench.load_results(tmp_path / "cli")
    # several runs one by one or as one list; anything else is one clear error, not a TypeError
    pd.testing.assert_frame_equal(
        lesionbench.load_results([tmp_path / "cli", tmp_path / "cli"]),
        lesionbench.load_results(tmp_path / "cli", str(tmp_path / "cli")),
    )
    with pytest.raises(lesionbench.LesionbenchError, match="must be str or Path, got int"):
        lesionbench.load_outcomes([tmp_path / "cli", 3])
    a, b = df.sort_values(KEY, ignore_index=True), cli.sort_values(KEY, ignore_index=True)
    pd.testing.assert_frame_equal(a[KEY + NUMBERS], b[KEY + NUMBERS], check_dtype=False)

    out = lesionbench.run(small_study(data), out=tmp_path / "api-out")  # the same crash-safe directory
    assert (tmp_path / "api-out" / "results.csv").is_file() and (tmp_path / "api-out" / "manifest.json").is_file()
    pd.testing.assert_frame_equal(
        out.sort_values(KEY, ignore_index=True)[KEY + NUMBERS], b[KEY + NUMBERS], check_dtype=False
    )


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def tiny_data(n: int = 48):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 8, 8, generator=g)
    return images, torch.arange(n) % 4


def test_run_on_a_users_own_module_and_tensors_restores_the_module():
    torch.manual_seed(0)
    model = Tiny().train()  # in training mode: left so afterwards
    model.bn.running_mean.uniform_(-0.5, 0.5)
    checksum = model_checksum(model)
    images, labels = tiny_data()
    df = lesionbench.run(model=model, data=(images, labels), draws=2, levels=[0.0, 0.5, 1.0])
    assert model_checksum(model) == checksum and model.training
    assert set(df["layer"]) == {"", "conv", "head"}
    assert set(df["perturbation"]) == {"clean", "synapse_knockout", "node_knockout", "weight_noise"}
    clean = df[df["perturbation"] == "clean"].iloc[0]
    model.eval()
    with torch.no_grad():
        expected = (model(images).argmax(1) == labels).float().mean().item()
    assert clean["top1"] == pytest.approx(expected) and clean["n_images"] == len(images)
    full = df[(df["layer"] == "conv") & (df["perturbation"] == "synapse_knockout") & (df["level"] == 1.0)]
    assert (full["top1"] != clean["top1"]).any() or (full["loss"] != clean["loss"]).all()
    # level 0 is the clean pass reused, not evaluated again: its numbers, no time of its own
    identity = df[(df["perturbation"] != "clean") & (df["level"] == 0.0)]
    assert len(identity) == 6 and (identity[["top1", "top5", "loss"]] == clean[["top1", "top5", "loss"]]).all().all()
    assert (identity["seconds"] == 0).all() and identity["images_per_s"].isna().all()
    assert (df.loc[df["level"] > 0, "seconds"] > 0).all()

    loader = DataLoader(TensorDataset(images, labels), batch_size=10)  # a DataLoader gives the same rows
    again = lesionbench.run(model=model, data=loader, draws=2, levels=[0.0, 0.5, 1.0])
    pd.testing.assert_frame_equal(df[KEY + NUMBERS], again[KEY + NUMBERS])
    # an untrained model on random images (4 classes, 48 images): at chance, so it is not scored; with its
    # clean accuracy taken as beyond chance (a passing clean row), both layers are
    from lesionbench.scores import at_chance

    assert list(at_chance(df)["model"]) == list(df["model"].unique()) and lesionbench.layer_scores(df).empty
    good = df.assign(top1=df["top1"].where(df["perturbation"] != "clean", 1.0))
    scores = lesionbench.layer_scores(good)
    assert set(scores["layer"]) == {"conv", "head"} and scores["score"].between(0, 1).all()


def test_lesioned_damages_exactly_as_the_study_cell_and_restores_bit_for_bit():
    torch.manual_seed(0)
    model = Tiny().eval()
    images, labels = tiny_data()
    df = lesionbench.run(
        model={"tiny": model}, data=(images, labels), perturbations=["node_knockout"], levels=[0.5], draws=2, seed=3
    )
    checksum = model_checksum(model)
    for draw in range(2):
        row = df[(df["layer"] == "conv") & (df["draw"] == draw) & (df["perturbation"] == "node_knockout")].iloc[0]
        with lesionbench.lesioned(
            model, "conv", "node_knockout", 0.5, seed=3, draw=draw, model_name="tiny", example=images[:1]
        ) as damaged:
            assert (damaged.conv.weight.flatten(1).abs().sum(1) == 0).sum() == 3  # floor(0.5 · 6) units
            assert (damaged.bn.weight == 0).sum() == 3  # silenced through the BatchNorm, as a study does
            with torch.no_grad():
                top1 = (damaged(images).argmax(1) == labels).float().mean().item()
        assert top1 == pytest.approx(row["top1"])
        assert model_checksum(model) == checksum
    with pytest.raises(RuntimeError, match="user code"):
        with lesionbench.lesioned(model, "head", "weight_noise", 1.0, example=images[:1]):
            raise RuntimeError("user code failed")
    assert model_checksum(model) == checksum


def test_lesioned_and_run_refuse_bad_input_in_one_line():
    model = Tiny().eval()
    images, labels = tiny_data()
    with pytest.raises(LesionbenchError, match="unknown layer 'nope'"):
        with lesionbench.lesioned(model, "nope", "node_knockout", 0.5, example=images[:1]):
            pass
    with pytest.raises(LesionbenchError, match="outside the range"):
        with lesionbench.lesioned(model, "conv", "node_knockout", 2.0, example=images[:1]):
            pass
    with pytest.raises(LesionbenchError, match="example="):
        with lesionbench.lesioned(model, "conv", "node_knockout", 0.5):
            pass
    with pytest.raises(LesionbenchError, match="needs data"):
        lesionbench.run(model=model)
    with pytest.raises(LesionbenchError, match="integer labels"):
        lesionbench.run(model=model, data=(images, labels.float()))


def test_public_surface_is_declared_and_documented():
    for name in lesionbench.__all__:
        obj = getattr(lesionbench, name)
        assert (obj.__doc__ or "").strip(), f"lesionbench.{name} has no docstring"
    assert {
        "hookimpl",
        "WeightPerturbation",
        "HookPerturbation",
        "LevelAxis",
        "Layer",
        "ModelSource",
        "LoadedModel",
        "DatasetSource",
        "RawDataset",
        "StudyPreset",
        "LesionbenchError",
        "run",
        "lesioned",
        "load_results",
    } <= set(lesionbench.__all__)
