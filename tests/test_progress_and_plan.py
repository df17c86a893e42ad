"""A study's size up front and its progress as it runs: ``lesionbench plan``/``run --dry-run`` and
``lesionbench.run(progress=...)``."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

import lesionbench
from conftest import run_flags, write_fashion
from lesionbench.cli import main
from lesionbench.errors import LesionbenchError


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(12, 1, 2, 2)
    return net, x, torch.arange(12) % 3


# two layers x one perturbation x (level 0 once + two levels x 2 draws) + the clean row
EXPECTED_CELLS = 1 + 2 * (1 + 2 * 2)


def test_a_callback_sees_every_cell_counted_against_the_total():
    net, x, y = _tiny()
    seen = []
    df = lesionbench.run(
        model=net,
        data=(x, y),
        perturbations=["synapse_knockout"],
        levels=[0.0, 0.5, 1.0],
        draws=2,
        device="cpu",
        progress=lambda done, total, cell: seen.append((done, total, cell)),
    )
    assert len(df) == EXPECTED_CELLS
    assert [s[0] for s in seen] == list(range(1, EXPECTED_CELLS + 1))
    assert {s[1] for s in seen} == {EXPECTED_CELLS}
    assert seen[0][2] == "model: clean" and "synapse_knockout" in seen[-1][2]


def test_progress_off_a_terminal_is_plain_lines_on_stderr_and_false_is_silent(capsys):
    net, x, y = _tiny()
    lesionbench.run(
        model=net, data=(x, y), perturbations=["synapse_knockout"], levels=[0.0, 0.5, 1.0], draws=2, device="cpu"
    )
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("progress:")]
    assert out == "" and lines[0].startswith(f"progress: 1/{EXPECTED_CELLS} cells")  # first cell at once
    assert lines[-1].startswith(f"progress: {EXPECTED_CELLS}/{EXPECTED_CELLS} cells (100.0%)")  # and the last
    lesionbench.run(
        model=net, data=(x, y), perturbations=["synapse_knockout"], levels=[0.0, 1.0], device="cpu", progress=False
    )
    out, err = capsys.readouterr()
    assert out == "" and "progress" not in err  # (a warning the CLI's log handler prints may remain)
    with pytest.raises(LesionbenchError, match="progress must be True, False or a callable"):
        lesionbench.run(model=net, data=(x, y), device="cpu", progress="bar")


@pytest.mark.parametrize("command", [["plan", "demo"], ["run", "demo", "--dry-run"]])
def test_the_dry_run_counts_the_cells_estimates_and_writes_nothing(tmp_path, monkeypatch, capsys, command):
    data = write_fashion(tmp_path / "fashion", n=40)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("COLUMNS", "200")
    flags = run_flags(data, layers="conv1,fc8", levels="0,0.5,1", draws=2, perturbations="synapse_knockout")
    assert main([*command, *flags]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "fashion_alexnet" in ln)
    assert [c.strip() for c in row.strip("│ ").split("│")][:4] == ["fashion_alexnet", "2", "2", str(EXPECTED_CELLS)]
    seconds = float(re.search(r"([\d.]+) s", row).group(1))
    assert seconds > 0  # a measured pass
    assert f"{EXPECTED_CELLS} cells on 20 images, 2 draw(s)" in out and "Nothing was run." in out
    assert os.listdir(work) == []  # no run directory, no lock


def test_the_dry_run_refuses_bad_input_as_run_does(tmp_path, capsys):
    assert (
        main(
            [
                "plan",
                "demo",
                "--layers",
                "no_such_layer",
                "--data",
                str(write_fashion(tmp_path / "f", n=20)),
                "--n-images",
                "10",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("lesionbench: error:") and "no_such_layer" in err and "Traceback" not in err
