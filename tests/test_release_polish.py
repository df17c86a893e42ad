"""The smaller items a first-time user hit: levels= as a mapping, row names from the API, the per-class
figure's title and axis, table titles off a terminal, ``list model``, TOML errors that name the file, no
``.lock`` left behind and a ``run.log`` in every run directory."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
from filelock import FileLock
from rich.console import Console
from rich.table import Table
from torch import nn

import lesionbench
from lesionbench.cli import main
from lesionbench.cli.tables import print_table
from lesionbench.errors import LesionbenchError


def _tiny():
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),
        torch.randn(12, 1, 2, 2),
        torch.arange(12) % 3,
    )


def test_levels_take_the_study_files_mapping_and_keep_the_rest_default():
    net, x, y = _tiny()
    df = lesionbench.run(
        model=net,
        data=(x, y),
        perturbations=["synapse_knockout", "weight_noise"],
        draws=1,
        levels={"weight_noise": [0, 1.5]},
        layers=["3"],
        device="cpu",
        progress=False,
    )
    levels = df[df["perturbation"] != "clean"].groupby("perturbation")["level"].apply(lambda s: sorted(set(s)))
    assert levels["weight_noise"] == [0.0, 1.5]
    assert levels["synapse_knockout"] == pytest.approx([i / 10 for i in range(11)])  # the paper's 0, 0.1, …, 1
    with pytest.raises(LesionbenchError, match=r"levels\['weight_noise'\] must be a non-empty list of numbers"):
        lesionbench.run(model=net, data=(x, y), levels={"weight_noise": "0,1"}, device="cpu", progress=False)


def test_api_rows_are_named_by_the_mapping_and_dataset_name():
    net, x, y = _tiny()
    df = lesionbench.run(
        model={"my_net": net},
        data=(x, y),
        dataset_name="my_val",
        perturbations=["weight_noise"],
        levels=[0, 1],
        draws=1,
        device="cpu",
        progress=False,
    )
    assert set(df["model"]) == {"my_net"} and set(df["dataset"]) == {"my_val"}
    with pytest.raises(LesionbenchError, match="dataset_name must be a non-empty string"):
        lesionbench.run(model=net, data=(x, y), dataset_name="", device="cpu", progress=False)


def test_the_per_class_figure_keeps_its_titles_inside_and_names_the_level_unit():
    from lesionbench.class_plots import class_retention_figure

    rows = [
        dict(
            model="a_model_with_a_long_name",
            dataset="d",
            perturbation="synapse_knockout",
            layer="features.0",
            layer_index=0,
            level=level,
            **{"class": c},
            n_images=10,
            accuracy=1 - level,
            clean=1.0,
            retention=1 - level,
        )
        for level in (0.0, 0.5, 1.0)
        for c in range(10)
    ]
    fig = class_retention_figure(
        pd.DataFrame(rows), "a_model_with_a_long_name", units={"synapse_knockout": "fraction p of weights zeroed"}
    )
    fig.canvas.draw()
    bounds = fig.bbox
    texts = [fig._suptitle, *(ax.title for ax in fig.axes if ax.get_visible())]
    for text in texts:
        box = text.get_window_extent()
        assert box.x0 >= bounds.x0 - 1 and box.x1 <= bounds.x1 + 1, text.get_text()
    assert fig.axes[0].get_xlabel().replace("\n", " ") == "fraction p of weights zeroed"


def test_a_table_title_stays_one_line_off_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=1000)  # not a terminal
    assert not console.is_terminal
    title = "fashion_alexnet: layer-robustness score (top1; 1 = untouched, 0 = chance)"
    table = Table(title=title)
    table.add_column("x")
    table.add_row("1")
    print_table(console, table)
    lines = out.getvalue().splitlines()
    assert lines[0] == title and sum(title.split()[0] in ln for ln in lines) == 1


def test_list_takes_the_singular(capsys):
    assert main(["list", "model"]) == 0
    assert "fashion_alexnet" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["list", "modelz"])
    assert exit_.value.code == 2


def test_a_toml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "my-study.toml"
    bad.write_text('name = "x"\nmodels = ["fashion_alexnet"\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "is not valid TOML" in err and not (tmp_path / "out").exists()


def test_a_finished_run_leaves_no_lock_and_always_a_run_log(tmp_path):
    net, x, y = _tiny()
    out = tmp_path / "run"
    lesionbench.run(
        model=net,
        data=(x, y),
        out=out,
        perturbations=["weight_noise"],
        levels=[0, 1],
        draws=1,
        device="cpu",
        progress=False,
    )
    names = {p.name for p in out.iterdir()}
    assert ".lock" not in names and "run.log" in names
    assert "run started" in (out / "run.log").read_text()


def test_a_lock_on_a_removed_lock_file_is_not_held(tmp_path):
    from lesionbench.runlock import _holds

    path = tmp_path / ".lock"
    lock = FileLock(str(path))
    lock.acquire(timeout=0)
    assert _holds(lock, path)
    path.unlink()  # what a finishing run does while it still holds its lock
    assert not _holds(lock, path)
    path.touch()  # and a newer run's file at the same path is another file
    assert not _holds(lock, path)
    lock.release()
