"""What the command line says: plain progress lines where output is not a terminal, tables at
their full width, warnings for models without weights or at chance, the command that finishes an
interrupted run, help with defaults, listings with levels and units, and compare's summary."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console
from torch import nn

import lesionbench
import lesionbench.cli as cli
import lesionbench.cli.progress as progress
from conftest import FINISHED, write_fashion
from lesionbench.cli import build_parser, main, weights_warnings
from lesionbench.compare import compare, to_markdown
from lesionbench.model_sources import ModelSpec
from lesionbench.store import read_results
from lesionbench.study import Study, with_overrides
from test_leaderboard import results

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """One layer, one perturbation at two levels, two draws, 40 random images: 4 cells in seconds.
    The model is built without weights, so its clean accuracy is at chance (0.1)."""
    data = write_fashion(tmp_path_factory.mktemp("data") / "fashion")
    path = tmp_path_factory.mktemp("study") / "small.toml"
    path.write_text(
        'name = "small"\nmodels = [{ ref = "fashion_alexnet", weights = "none" }]\n'
        'perturbations = ["weight_noise"]\nlayers = ["fc8"]\ndraws = 2\ndevice = "cpu"\n'
        f'[levels]\nweight_noise = [0.0, 1.0]\n[dataset]\nname = "fashion_mnist"\npath = "{data}"\nn_images = 40\n'
    )
    return path


@pytest.fixture(autouse=True)
def plain_consoles(monkeypatch):
    """stdout and stderr as CI sees them: not terminals."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(cli, "console", cli.make_console())
    monkeypatch.setattr(cli, "err_console", cli.make_console(stderr=True))


# ---------------------------------------------------------------- progress and width


def test_plain_progress_prints_counts_and_eta_at_an_interval():
    """Not a terminal: a line on the first cell, then at most one per interval, and the last."""
    now = [0.0]
    out = Console(file=io.StringIO(), width=1000)
    assert not out.is_terminal
    with progress.plain_progress(out, 10, interval=3.0, clock=lambda: now[0]) as tick:
        for i in range(10):
            now[0] = float(i)  # one cell a second
            tick(f"cell {i}")
    lines = out.file.getvalue().splitlines()
    assert [l.split(" cells")[0] for l in lines] == [
        "progress: 1/10",
        "progress: 4/10",
        "progress: 7/10",
        "progress: 10/10",
    ]
    assert lines[1] == "progress: 4/10 cells (40.0%), 0:00:03 elapsed, ETA 0:00:06 · cell 3"
    assert lines[-1].endswith("ETA 0:00:00 · cell 9")


def test_a_run_in_ci_prints_progress_lines_and_a_warning_for_a_model_at_chance(study, tmp_path, capsys):
    """The model at chance is not scored: the summary and the leaderboard say so, and the exit status is 3."""
    assert main(["run", str(study), "--out", str(tmp_path / "run")]) == cli.NOT_SCORED_EXIT == 3
    captured = capsys.readouterr()
    lines = [l for l in captured.out.splitlines() if l.startswith("progress: ")]
    assert lines and lines[-1].startswith("progress: 4/4 cells (100.0%)")
    assert "\x1b[" not in captured.out  # no terminal control codes in a log
    warnings = [l for l in captured.err.splitlines() if "at chance" in l]
    assert len(warnings) == 1 and warnings[0].startswith("lesionbench: warning: fashion_alexnet: clean top1")
    assert "at chance" in (tmp_path / "run" / "run.log").read_text()
    assert "fashion_alexnet: not scored: clean accuracy at chance" in captured.out
    board = (tmp_path / "run" / "LEADERBOARD.md").read_text()
    (page,) = (tmp_path / "run" / "models").glob("*fashion-alexnet.md")  # the model's own page
    assert "not scored: clean accuracy at chance" in board
    assert "not scored: clean accuracy at chance" in page.read_text() and "robust" not in page.read_text()


def test_tables_keep_their_width_when_output_is_not_a_terminal(capsys):
    assert main(["list", "perturbations"]) == 0
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("│ quantize "))
    assert max(len(l) for l in out.splitlines()) > 120  # wider than rich's default of 80
    for needle in (
        "8, 7, …, 2 (7)",
        "2 – 16",
        "bit width k",
        "damage grows as it falls",
        "Round the weights to k bits",
    ):
        assert needle in row, (needle, row)
    log_row = next(l for l in out.splitlines() if l.startswith("│ bit_flip "))
    assert "bit error rate p (log scale)" in log_row


def test_list_models_names_what_each_source_builds(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "│ example " not in out and "│ example\n" not in out
    timm_row = next(l for l in out.splitlines() if l.startswith("│ timm:<name> "))
    assert "E.g. timm:resnet18" in timm_row


# ---------------------------------------------------------------- weights and chance


def test_models_flag_warns_when_the_study_named_weights_and_the_new_model_names_none(tmp_path, capsys):
    shipped = REPO / "models" / "weights" / "fashion_alexnet.pt"
    path = tmp_path / "weighted.toml"
    path.write_text(
        f'name = "w"\nmodels = [{{ ref = "fashion_alexnet", checkpoint = "{shipped}" }}]\n'
        '[dataset]\nname = "fashion_mnist"\npath = "/nonexistent"\n'
    )
    assert main(["run", str(path), "--models", "fashion_vgg", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("lesionbench: warning: --models fashion_vgg: no weights named")
    assert "fashion_alexnet (checkpoint=" in err[0]
    assert err[1].startswith("lesionbench: error:")  # the run itself stops on the missing data
    # a model the study lists keeps its entry, so naming it again warns of nothing
    assert main(["run", str(path), "--models", "fashion_alexnet", "--out", str(tmp_path / "o")]) == 2
    assert "warning" not in capsys.readouterr().err


def test_weights_warnings_and_overrides_keep_listed_entries():
    study = Study(models=(ModelSpec("torchvision:alexnet", weights="IMAGENET1K_V1"),))
    kept = with_overrides(study, models=["torchvision:alexnet", "timm:resnet18"])
    assert kept.models[0].weights == "IMAGENET1K_V1" and kept.models[1] == ModelSpec("timm:resnet18")
    (text,) = weights_warnings(study.models, kept.models[1:])
    assert "timm:resnet18" in text and "weights='IMAGENET1K_V1'" in text
    assert weights_warnings(study.models, kept.models[:1]) == []
    none = (ModelSpec("fashion_alexnet", weights="none"),)
    assert weights_warnings(none, (ModelSpec("fashion_vgg"),)) == []  # the study named none either


def _separable(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 10
    return torch.nn.functional.one_hot(labels, 10).float(), labels


@pytest.mark.parametrize("trained, warned", [(True, False), (False, True)], ids=["trained", "untrained"])
def test_a_clean_accuracy_at_chance_is_warned(trained, warned, caplog):
    """A linear model reading the one-hot label is 100% right with identity weights and at
    chance (0.1: it always answers class 0) with zero weights."""
    model = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(10) if trained else torch.zeros(10, 10))
    with caplog.at_level("WARNING", logger="lesionbench"):
        lesionbench.run(
            model=model, data=_separable(), perturbations=["weight_noise"], levels=[0.0, 1.0], draws=1, device="cpu"
        )
    messages = [r.getMessage() for r in caplog.records if "at chance" in r.getMessage()]
    assert bool(messages) == warned
    if warned:
        assert messages[0].startswith("model: clean top1 accuracy 0.100 on 40 images is at chance (0.1)")


# ---------------------------------------------------------------- flags, interruption, help


def test_dataset_flag_drops_the_study_path_and_split(study, tmp_path, capsys):
    assert main(["run", str(study), "--dataset", "image_folder", "--out", str(tmp_path / "o")]) == 2
    assert "dataset image_folder needs a path" in capsys.readouterr().err
    changed = with_overrides(Study(models=(ModelSpec("m"),)), dataset="image_folder")
    assert changed.dataset.name == "image_folder" and changed.dataset.path is None and changed.dataset.split == "val"


def test_ctrl_c_prints_the_command_that_finishes_the_run(study, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    @contextmanager
    def interrupted_after_two(console, total):
        count = [0]

        def tick(_label):
            count[0] += 1
            if count[0] == 2:
                raise KeyboardInterrupt

        yield tick

    with monkeypatch.context() as m:
        m.setattr(progress, "rich_progress", interrupted_after_two)
        assert main(["run", str(study), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"lesionbench: interrupted; finish it with: lesionbench run --resume {out}"
    assert len(read_results(out)) < 4
    assert main(["run", "--resume", str(out), "--no-plots"]) in FINISHED  # that command finishes it
    assert len(read_results(out)) == 4 and (out / "LEADERBOARD.md").is_file()


def test_every_option_has_help_with_its_default_and_help_describes_the_tool(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    missing = []
    for name, sub in subparsers.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            if not action.help or "default" not in action.help:
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "damage a trained network one layer at a time" in text and "exit codes:" in text
    assert "the logic lives elsewhere" not in text


def test_help_and_listings_import_no_heavy_library():
    """--help needs none of torch, timm, torchvision, matplotlib, pandas, scipy; listings and
    plugins none but torch (the built-in perturbations are written with it)."""
    heavy = ["torch", "timm", "torchvision", "matplotlib", "pandas", "scipy"]
    code = (
        "import sys, contextlib, io\nfrom lesionbench.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(sys.argv[1:])\n    except SystemExit:\n        pass\n"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    for argv, allowed in (
        (["--help"], []),
        (["run", "--help"], []),
        (["leaderboard", "--help"], []),
        (["list", "models"], ["torch"]),
        (["list", "studies"], ["torch"]),
        (["plugins"], ["torch"]),
    ):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
        assert json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"')) == allowed, argv


# ---------------------------------------------------------------- compare


def test_compare_summarises_what_only_one_side_has_and_warns_of_unlike_runs():
    base = pd.concat(
        [results("a", perts=("p", "q")), results("b", layers={f"l{i}": [0.9, 0.5, 0.5] for i in range(30)})],
        ignore_index=True,
    )
    new = results("a", perts=("p",))
    new.loc[new["perturbation"] == "clean", "n_images"] = 50
    c = compare(new, base, 0.05)
    assert c.only_baseline_summary == ["a: q (all 2 layers)", "b: not run (30 layer scores)"]
    text = to_markdown(c, 0.05)
    assert "l17" not in text  # not every layer of a model that was not re-run
    assert "a: 50 images in new, 100 in baseline" in c.warnings
    fewer = results("a", perts=("p",))
    fewer = fewer[fewer["draw"] == 0]
    fewer.loc[fewer["level"] == 1.0, "level"] = 0.75
    warnings = compare(fewer, base, 0.05).warnings
    assert "a · p: levels 0, 0.5, 0.75 in new, 0, 0.5, 1 in baseline" in warnings
    assert "a · p: 1 draws per level in new, 2 in baseline" in warnings


def test_compare_puts_no_arrow_beside_a_change_that_rounds_to_zero():
    base = results()
    tiny = results(layers={"conv1": [0.9, 0.1, 0.1], "fc8": [0.9, 0.9, 0.5 + 1e-5]})
    line = next(l for l in to_markdown(compare(tiny, base, 0.05), 0.05).splitlines() if "fc8" in l)
    assert "+0.000" in line and "⬆" not in line
    better = results(layers={"conv1": [0.9, 0.1, 0.1], "fc8": [0.9, 0.9, 0.6]})
    line = next(l for l in to_markdown(compare(better, base, 0.05), 0.05).splitlines() if "fc8" in l)
    assert "⬆" in line
