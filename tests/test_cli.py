"""The ``lesionbench`` command end to end on a tiny Fashion-MNIST made here: the rows a study
yields, determinism, exact restoration, resume after a crash, and bad input (exit 2, one line on
stderr, nothing created).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

import lesionbench.cli as cli
from conftest import FINISHED, write_fashion
from lesionbench.cli import main
from lesionbench.executors.local import execute
from lesionbench.perturbation import model_checksum
from lesionbench.plan import prepare
from lesionbench.registry import create_registry
from lesionbench.store import COLUMNS, RunDir, read_results
from lesionbench.study import load_study

LAYERS = ["conv1", "fc8"]
PERTURBATIONS = ["synapse_knockout", "weight_noise"]
LEVELS = {"synapse_knockout": [0.0, 0.5, 1.0], "weight_noise": [0.0, 1.0]}
DRAWS = 2
KEY = ["model", "layer", "perturbation", "level", "draw"]
TIMING = ["seconds", "images_per_s"]


def study_text(data: Path, model: str = '{ref = "fashion_alexnet", weights = "none"}', **extra: str) -> str:
    top = {
        "name": '"tiny"',
        "models": f"[{model}]",
        "perturbations": "[" + ", ".join(f'"{p}"' for p in PERTURBATIONS) + "]",
        "layers": "[" + ", ".join(f'"{l}"' for l in LAYERS) + "]",
        "draws": str(DRAWS),
        "seed": "0",
        "device": '"cpu"',
        "batch_size": "32",
    }
    top.update(extra)
    lines = [f"{k} = {v}" for k, v in top.items()]
    lines.append("[levels]")
    lines += [f"{p} = {v}" for p, v in LEVELS.items()]
    lines += ["[dataset]", 'name = "fashion_mnist"', f'path = "{data}"', "n_images = 40"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory, fashion) -> Path:
    path = tmp_path_factory.mktemp("study") / "tiny.toml"
    path.write_text(study_text(fashion))
    return path


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables wide enough that no name is folded or cut."""
    monkeypatch.setattr(cli, "console", Console(width=250))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, study) -> tuple[Path, pd.DataFrame]:
    """One uninterrupted run of the tiny study, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["run", str(study), "--out", str(out), "--no-plots"]) in FINISHED
    return out, read(out)


def read(out: Path) -> pd.DataFrame:
    return read_results(out / "results.csv")


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=TIMING).sort_values(KEY).reset_index(drop=True)


# ---------------------------------------------------------------- a run end to end


def test_run_writes_the_expected_rows(reference):
    out, df = reference
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.split(",") == COLUMNS + ["run", "checksum"]  # rows bound to their run (results schema 2)
    assert (out / "manifest.json").is_file()

    clean = df[df["perturbation"] == "clean"]
    assert len(clean) == 1
    clean = clean.iloc[0]
    assert clean["model"] == "fashion_alexnet" and clean["layer"] == "" and clean["n_images"] == 40

    cells = df[df["perturbation"] != "clean"]
    assert (cells["error"] == "").all()
    assert (cells["n_images"] == 40).all()
    expected = len(LAYERS) * sum(1 + DRAWS * (len(v) - 1) for v in LEVELS.values())
    assert len(cells) == expected and len(df) == expected + 1
    assert not df.duplicated(KEY).any()
    for layer in LAYERS:
        for pert, levels in LEVELS.items():
            g = cells[(cells["layer"] == layer) & (cells["perturbation"] == pert)]
            for level in levels:
                at = g[g["level"] == level]
                if level == 0.0:
                    assert list(at["draw"]) == [0]
                    # the identity level is the clean model
                    for col in ("top1", "top5", "loss"):
                        assert at[col].iloc[0] == clean[col]
                else:
                    assert sorted(at["draw"]) == list(range(DRAWS))
    # layers keep their forward-order index and depth
    assert set(zip(cells["layer"], cells["layer_index"])) == {("conv1", 0), ("fc8", 7)}
    assert set(cells["relative_depth"]) == {0.0, 1.0}
    # knocking out every weight of fc8 leaves only its bias: all images get the same logits
    full = cells[(cells["layer"] == "fc8") & (cells["perturbation"] == "synapse_knockout") & (cells["level"] == 1.0)]
    assert (full["loss"] != clean["loss"]).all()
    assert full["seed"].nunique() == DRAWS


def test_runs_are_deterministic_and_seed_dependent(reference, study, tmp_path):
    _, first = reference
    again = tmp_path / "again"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # whatever the global generator holds must not matter
        torch.rand(1000)
        assert main(["run", str(study), "--out", str(again), "--no-plots"]) in FINISHED
    cols = KEY + ["seed", "top1", "top5", "loss"]
    pd.testing.assert_frame_equal(ordered(first)[cols], ordered(read(again))[cols])

    other = tmp_path / "other"
    assert main(["run", str(study), "--out", str(other), "--seed", "7", "--no-plots"]) in FINISHED
    a, b = ordered(first), ordered(read(other))
    assert list(a[KEY].itertuples(index=False)) == list(b[KEY].itertuples(index=False))
    cells = a["perturbation"] != "clean"
    assert (a.loc[cells, "seed"] != b.loc[cells, "seed"]).all()
    assert (b.loc[~cells, "seed"] == 7).all()


def test_model_is_bit_identical_after_a_run(study, tmp_path):
    registry = create_registry()
    plan = prepare(load_study(str(study), {}), registry)
    module = plan.models[0].loaded.module
    before = model_checksum(module)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    execute(plan, RunDir.create(tmp_path / "run", plan.study.to_dict(), plan.fingerprint()), debug=True)
    assert model_checksum(module) == before
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the perturbations did change something while they were applied
    df = read(tmp_path / "run")
    assert df["loss"].nunique() > 1


def test_debug_run_is_clean(study, tmp_path):
    out = tmp_path / "dbg"
    assert (
        main(
            [
                "run",
                str(study),
                "--out",
                str(out),
                "--no-plots",
                "--debug",
                "--perturbations",
                "node_knockout",
                "--levels",
                "0,0.5",
            ]
        )
        in FINISHED
    )
    df = read(out)
    assert set(df["perturbation"]) == {"clean", "node_knockout"}
    assert len(df) == 1 + len(LAYERS) * (1 + DRAWS)
    assert (df["error"] == "").all()


def test_resume_after_a_crash_equals_the_uninterrupted_run(reference, study, tmp_path):
    ref_dir, ref = reference
    out = tmp_path / "crashed"
    assert main(["run", str(study), "--out", str(out), "--no-plots"]) in FINISHED
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    torn = lines[5][: len(lines[5]) // 2]
    (out / "results.csv").write_text("".join(lines[:5]) + torn)  # header, 4 rows, half a row

    assert main(["run", "--resume", str(out), "--no-plots"]) in FINISHED
    resumed = read(out)
    assert len(resumed) == len(ref)
    pd.testing.assert_frame_equal(ordered(resumed), ordered(ref))
    # the four surviving rows were kept as written, not evaluated again
    assert (out / "results.csv").read_text().splitlines(keepends=True)[:5] == lines[:5]


def test_resume_with_a_different_study_is_refused(reference, tmp_path, capsys):
    ref_dir, _ = reference
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("manifest.json", "results.csv"):
        (copy / name).write_bytes((ref_dir / name).read_bytes())
    before = (copy / "results.csv").read_bytes()
    capsys.readouterr()
    assert main(["run", "--resume", str(copy), "--draws", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesionbench: error:") and "different study" in err and "\n" not in err
    assert (copy / "results.csv").read_bytes() == before


def test_resume_of_a_non_run_directory_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("somebody else's files")  # an empty or absent DIR starts the study there
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a lesionbench run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_run_into_a_directory_with_results_is_refused(reference, study, capsys):
    ref_dir, _ = reference
    before = (ref_dir / "results.csv").read_bytes()
    capsys.readouterr()
    assert main(["run", str(study), "--out", str(ref_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesionbench: error:") and "already holds results" in err and "\n" not in err
    assert (ref_dir / "results.csv").read_bytes() == before


# ---------------------------------------------------------------- bad input


def expect_bad(args: list[str], out: Path, capsys, *needles: str) -> str:
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("lesionbench: error: "), err
    assert "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists(), "bad input must leave no run directory behind"
    return err


def expect_bad_study(text: str, tmp_path: Path, capsys, *needles: str) -> str:
    """:func:`expect_bad` for ``run`` of the study file ``tmp_path/s.toml`` holding ``text``."""
    path = tmp_path / "s.toml"
    path.write_text(text)
    return expect_bad(["run", str(path)], tmp_path / "o", capsys, *needles)


def test_unknown_model(study, tmp_path, capsys):
    err = expect_bad(
        ["run", str(study), "--models", "fashion_alexnett"],
        tmp_path / "o",
        capsys,
        "unknown model 'fashion_alexnett'",
        "Did you mean 'fashion_alexnet'?",
    )
    # every name offered is one the harness accepts
    valid = err.split("Valid: ", 1)[1].split(", ")
    assert "fashion_alexnet" in valid and "timm:<name>" in valid and "torchvision:<name>" in valid
    from lesionbench.registry import create_registry

    sources = [c.obj for c in create_registry().contributions("models").values()]
    bare = [name for name in valid if ":" not in name]
    assert bare and all(any(s.claims(name) for s in sources) for name in bare), valid


def test_unknown_model_source(study, tmp_path, capsys):
    expect_bad(
        ["run", str(study), "--models", "timmm:resnet18"],
        tmp_path / "o",
        capsys,
        "unknown model source 'timmm'",
        "Did you mean 'timm'?",
    )


def test_unknown_layer(study, tmp_path, capsys):
    expect_bad(["run", str(study), "--layers", "conv1,conv9"], tmp_path / "o", capsys, "unknown layer 'conv9'", "fc8")


def test_unknown_perturbation(study, tmp_path, capsys):
    err = expect_bad(
        ["run", str(study), "--perturbations", "synapse_knockot"],
        tmp_path / "o",
        capsys,
        "unknown perturbation 'synapse_knockot'",
        "Did you mean 'synapse_knockout'?",
    )
    for name in ("node_knockout", "synapse_knockout", "weight_noise"):
        assert name in err.split("Valid:", 1)[1]


def test_unknown_dataset(fashion, tmp_path, capsys):
    expect_bad_study(
        study_text(fashion).replace('name = "fashion_mnist"', 'name = "fashion_mnst"'),
        tmp_path,
        capsys,
        "unknown dataset 'fashion_mnst'",
        "Did you mean 'fashion_mnist'?",
        "image_folder",
    )


def test_unknown_study_preset(tmp_path, capsys):
    expect_bad(["run", "dem"], tmp_path / "o", capsys, "unknown study 'dem'", "Did you mean 'demo'?")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--levels", "0,1.5", "--perturbations", "synapse_knockout"], ["level 1.5", "[0.0, 1.0]", "synapse_knockout"]),
        (["--levels", "-0.1", "--perturbations", "weight_noise"], ["level -0.1", "weight_noise"]),
        (["--levels", "0,2.5"], ["level 2.5", "[0.0, 1.0]"]),
    ],
)
def test_level_outside_range(study, tmp_path, capsys, args, needles):
    expect_bad(["run", str(study), *args], tmp_path / "o", capsys, "outside the range", *needles)


def test_missing_data_path(study, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    expect_bad(["run", str(study), "--data", str(missing)], tmp_path / "o", capsys, str(missing))


def test_missing_study_file(tmp_path, capsys):
    expect_bad(["run", str(tmp_path / "absent.toml")], tmp_path / "o", capsys, "does not exist")


def test_study_with_unknown_key(fashion, tmp_path, capsys):
    expect_bad_study(study_text(fashion, drawz="3"), tmp_path, capsys, "unknown key 'drawz'")


def test_study_with_unknown_dataset_key(fashion, tmp_path, capsys):
    expect_bad_study(study_text(fashion) + "n_imgs = 3\n", tmp_path, capsys, "unknown key dataset.'n_imgs'")


def test_study_with_wrong_type(fashion, tmp_path, capsys):
    expect_bad_study(study_text(fashion, draws='"five"'), tmp_path, capsys, "'draws'", "int", "five")


def test_study_with_invalid_toml(tmp_path, capsys):
    expect_bad_study("models = [\n", tmp_path, capsys, "not valid TOML")


def test_labels_beyond_the_model_classes(tmp_path, capsys):
    labels = np.arange(60) % 10
    labels[3] = 12
    data = write_fashion(tmp_path / "fashion12", labels=labels)
    path = tmp_path / "s.toml"
    path.write_text(study_text(data, model='{ref = "fashion_alexnet", weights = "none", options = {num_classes = 10}}'))
    expect_bad(["run", str(path)], tmp_path / "o", capsys, "label 12", "10 classes", "fashion_alexnet")
    # and with enough output units the same data runs
    path.write_text(study_text(data, model='{ref = "fashion_alexnet", weights = "none", options = {num_classes = 13}}'))
    assert (
        main(
            [
                "run",
                str(path),
                "--out",
                str(tmp_path / "ok"),
                "--no-plots",
                "--layers",
                "fc8",
                "--perturbations",
                "node_knockout",
                "--levels",
                "0,1",
                "--draws",
                "1",
            ]
        )
        in FINISHED
    )


def test_checkpoint_carrying_a_pickled_object(tmp_path, fashion, capsys):
    ckpt = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "extra": argparse.Namespace(x=1)}, ckpt)
    expect_bad_study(
        study_text(fashion, model='{ref = "fashion_alexnet", checkpoint = "evil.pt"}'),
        tmp_path,
        capsys,
        "evil.pt",
        "weights_only",
    )


def test_checkpoint_of_another_model(tmp_path, fashion, capsys):
    ckpt = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(32, 1, 3, 3)}, ckpt)
    expect_bad_study(
        study_text(fashion, model='{ref = "fashion_alexnet", checkpoint = "other.pt"}'),
        tmp_path,
        capsys,
        "other.pt",
        "does not fit",
        "missing",
    )


# ---------------------------------------------------------------- listings


@pytest.mark.parametrize(
    "kind, names",
    [
        ("models", ["fashion_alexnet", "timm:<name>", "torchvision:<name>", "timm:resnet18", "torchvision:alexnet"]),
        ("perturbations", ["synapse_knockout", "node_knockout", "weight_noise"]),
        ("datasets", ["fashion_mnist", "image_folder"]),
        ("studies", ["demo", "alexnet-baseline", "timm-cnns"]),
    ],
)
def test_list(kind, names, capsys):
    assert main(["list", kind]) == 0
    out = capsys.readouterr().out
    for name in names:
        assert name in out, (name, out)


def test_list_unknown_kind_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["list", "optimizers"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_plugins_lists_every_builtin_with_its_contributions(capsys):
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def row(plugin: str) -> str:
        """The table row of a plugin, with the lines its wrapped cells continue on."""
        i = next(i for i, l in enumerate(lines) if l.strip("│┃ ").startswith(plugin + " "))
        out = [lines[i]]
        for line in lines[i + 1 :]:
            cells = line.split("│")
            if len(cells) < 3 or cells[1].strip():  # a border, or the next plugin's row
                break
            out.append(line)
        return " ".join(c.strip() for l in out for c in l.split("│")[4:5]) + " " + out[0]

    assert "perturbation synapse_knockout" in row("synapse_knockout")
    assert "dataset fashion_mnist" in row("fashion_mnist")
    assert "study demo" in row("studies") and "study timm-cnns" in row("studies")
    assert "model fashion" in row("fashion")
    assert "model timm" in row("timm") and "model torchvision" in row("torchvision")
    assert "failed" not in "\n".join(lines)
    import lesionbench

    assert f"lesionbench {lesionbench.__version__}" in row("synapse_knockout")  # distribution and version


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--device", "bogus"], ["unknown device 'bogus'"]),
        (["--seed", "-1"], ["'seed' must be a non-negative integer"]),
        (["--levels", "0,0.5,0.5"], ["level 0.5 is given twice"]),
    ],
    ids=["device", "seed", "duplicate-level"],
)
def test_more_bad_input(study, tmp_path, capsys, args, needles):
    expect_bad(["run", str(study), *args], tmp_path / "o", capsys, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(study, tmp_path, capsys):
    expect_bad(["run", str(study), "--device", "cuda"], tmp_path / "o", capsys, "CUDA is not available")


def test_model_options_the_builder_rejects(fashion, tmp_path, capsys):
    expect_bad_study(
        study_text(fashion, model='{ref = "fashion_alexnet", weights = "none", options = {bogus = 1}}'),
        tmp_path,
        capsys,
        "could not be built with options",
    )


def test_out_that_is_a_file_and_a_damaged_manifest(study, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["run", str(study), "--out", str(afile)]) == 2
    assert afile.read_text() == "mine"
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{not json")
    (run / "results.csv").write_text(",".join(COLUMNS) + "\n")
    assert main(["run", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "unreadable or damaged" in err


def test_resume_under_another_torch_version_is_refused(reference, tmp_path, capsys):
    import json
    import shutil

    out, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["torch"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    before = (copy / "results.csv").read_bytes()
    assert main(["run", "--resume", str(copy)]) == 2
    assert "torch 0.0.1" in capsys.readouterr().err
    assert (copy / "results.csv").read_bytes() == before
