"""Executors and layer scores as plugin kinds, and built-ins switched off with ``-p no:NAME``.

The must-show of issue #26: a third-party package (written here into a temporary site directory
with a ``.dist-info`` naming its entry points, as pip would install it) adds a toy executor and a
toy score, each one module, and the command line uses them (``run --executor toy``, ``--score``).
The toy reporter of the same issue is a separate fixture and test (:func:`toy_reporter`), skipped
until the ``reporters`` kind is merged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console
from torch import nn

import lesionbench
import lesionbench.cli as cli
import lesionbench.registry as registry_mod
from conftest import FINISHED, run_flags, write_fashion
from lesionbench.cli import main
from lesionbench.errors import LesionbenchError
from lesionbench.registry import create_registry, get_registry
from lesionbench.store import read_results
from toy_plugins import install_plugin

TOY_EXECUTOR = '''
"""A toy executor: the local backend with the blocks in reverse order, each job logged to a file."""
from contextlib import contextmanager

from lesionbench import ExecutorPlugin, hookimpl
from lesionbench.executors.driver import drive
from lesionbench.executors.local import LocalExecutor, evaluate_here


class ReverseExecutor(LocalExecutor):
    name = "toy"

    def __init__(self, log):
        self.log = log

    @contextmanager
    def session(self, plan, registry):
        def backend(plan, jobs, debug, note):
            with open(self.log, "a") as f:
                f.writelines(job.describe() + "\\n" for job in jobs)
            return evaluate_here(plan, list(reversed(jobs)), debug, note)

        yield lambda store, tick, debug: drive(plan, store, tick, debug, backend)


@hookimpl
def lesionbench_executors():
    return [ExecutorPlugin("toy", "Blocks in reverse order, logged.", ReverseExecutor, {"log": "file of the jobs"})]
'''

TOY_SCORE = '''
"""A toy layer score: the lowest retention over the levels studied."""
from lesionbench import hookimpl


class LowestRetention:
    name = "toy_min"
    description = "The lowest retention over the levels studied."

    def of(self, x, r):
        return r.min(axis=0)


@hookimpl
def lesionbench_scores():
    return [LowestRetention()]
'''


def install(root: Path, modules: dict[str, str]) -> None:
    """Lay the modules out as pip would, with a ``toy-0.1.dist-info`` naming one entry point each."""
    install_plugin(root, "toy", {name: name for name in modules}, modules)


@pytest.fixture
def fresh(monkeypatch):
    """The process-wide registry rebuilt for this test (and the previous one back afterwards)."""
    monkeypatch.setattr(registry_mod, "_default", None)
    monkeypatch.setattr(registry_mod, "_disabled", frozenset())
    monkeypatch.setattr(cli, "console", Console(width=250))


@pytest.fixture
def toy_site(tmp_path, monkeypatch, fresh):
    root = tmp_path / "site"
    root.mkdir()
    install(root, {"toy_executor": TOY_EXECUTOR, "toy_score": TOY_SCORE})
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in ("toy_executor", "toy_score", "toy_reporter"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)


# ---------------------------------------------------------------- the toy plugin package


def test_a_toy_executor_from_a_plugin_runs_from_the_cli_and_writes_the_local_rows(toy_site, tmp_path, capsys):
    data = write_fashion(tmp_path / "fashion", n=20)
    common = [
        "demo",
        *run_flags(data, layers="conv1,fc8", perturbations="synapse_knockout,weight_noise"),
        "--no-publish",
    ]
    assert main(["run", *common, "--out", str(tmp_path / "local")]) in FINISHED
    log = tmp_path / "jobs.txt"
    assert (
        main(["run", *common, "--out", str(tmp_path / "toy"), "--executor", "toy", "--executor-option", f"log={log}"])
        in FINISHED
    )
    jobs = log.read_text().splitlines()  # the toy received each block's identity, in plan order
    assert sorted(jobs) == sorted(
        f"fashion_alexnet · {layer} · {p}" for layer in ("conv1", "fc8") for p in ("synapse_knockout", "weight_noise")
    )
    local, toy = read_results(tmp_path / "local"), read_results(tmp_path / "toy")
    blocks = lambda df: list(dict.fromkeys(zip(df["layer"], df["perturbation"])))  # noqa: E731
    assert blocks(toy)[1:] == blocks(local)[1:][::-1]  # written in the toy's order (after the clean row)
    key = ["layer", "perturbation", "level", "draw"]
    order = lambda df: df.sort_values(key, ignore_index=True)  # noqa: E731
    pd.testing.assert_frame_equal(
        order(toy)[key + ["seed", "top1", "top5"]], order(local)[key + ["seed", "top1", "top5"]]
    )
    capsys.readouterr()
    assert (
        main(["run", *common, "--out", str(tmp_path / "x"), "--executor", "toy", "--executor-option", "speed=2"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "executor 'toy' takes no option 'speed'" in err and "\n" not in err and not (tmp_path / "x").exists()


def eye_run(out: Path) -> pd.DataFrame:
    """A run directory of a 10-class linear model that reads its class off the input (top-1 0.94),
    damaged by synapse knockout at 0, 0.25 and 0.5 (two draws)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    images = torch.nn.functional.one_hot(labels, 10).float() + 0.3 * torch.randn(200, 10, generator=g)
    net = nn.Sequential(nn.Linear(10, 10))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(10))
        net[0].bias.zero_()
    return lesionbench.run(
        model={"eye": net},
        data=(images, labels),
        out=out,
        perturbations=["synapse_knockout"],
        levels=[0, 0.25, 0.5],
        draws=2,
        progress=False,
    )


def test_a_toy_score_from_a_plugin_is_chosen_by_name_in_compare_and_the_leaderboard(toy_site, tmp_path, capsys):
    df = eye_run(tmp_path / "run")
    clean = df.loc[df["perturbation"] == "clean", "top1"].iloc[0]
    means = df[df["perturbation"] == "synapse_knockout"].groupby("level")["top1"].mean()
    lowest = float(np.clip((means - 0.1) / (clean - 0.1), 0, 1).min())  # the toy's definition, written out
    area = lesionbench.layer_scores(df)["score"].iloc[0]
    assert abs(lowest - area) > 0.02 and f"{lowest:.2f}" != f"{area:.2f}"  # the two scores tell apart, as printed
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--all", "--score", "toy_min"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "synapse\\_knockout score" in line)
    assert f"| {lowest:.3f} " in row
    assert (
        main(
            [
                "leaderboard",
                str(tmp_path / "run"),
                "--score",
                "toy_min",
                "--no-plots",
                "--out",
                str(tmp_path / "board" / "L.md"),
            ]
        )
        == 0
    )
    page = (tmp_path / "board" / "models" / "tensors--eye.md").read_text()
    assert f"(score {lowest:.2f} [" in page and f"(score {area:.2f} [" not in page
    capsys.readouterr()
    assert main(["leaderboard", str(tmp_path / "run"), "--score", "toy_max", "--out", str(tmp_path / "no.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown score 'toy_max'" in err and "toy_min" in err and "\n" not in err
    assert not (tmp_path / "no.md").exists()


TOY_REPORTER = '''
"""A toy reporter: one line per ranked model, with its overall score."""
from lesionbench import hookimpl


class Lines:
    name = "toy"
    description = "One line per ranked model."
    suffix = ".txt"

    def render(self, board, single=False):
        return {"": "".join(f"{e.model} {e.overall.value:.4f}\\n" for t in board.tracks for e in t.entries)}


@hookimpl
def lesionbench_reporters():
    return [Lines()]
'''


@pytest.fixture
def toy_reporter(toy_site):
    """The toy reporter module of the same package (hook ``lesionbench_reporters``, the contract of
    ``lesionbench.reporters.Reporter``), installed beside the toy executor and score."""
    install(toy_site, {"toy_executor": TOY_EXECUTOR, "toy_score": TOY_SCORE, "toy_reporter": TOY_REPORTER})
    return toy_site


def test_a_toy_reporter_from_a_plugin_renders_the_leaderboard_with_the_toy_score(toy_reporter, tmp_path):
    df = eye_run(tmp_path / "run")
    out = tmp_path / "board.txt"
    assert (
        main(
            [
                "leaderboard",
                str(tmp_path / "run"),
                "--format",
                "toy",
                "--score",
                "toy_min",
                "--no-plots",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lowest = float(lesionbench.layer_scores(df, score="toy_min")["score"].iloc[0])
    assert out.read_text() == f"eye {lowest:.4f}\n"


# ---------------------------------------------------------------- switching a built-in off


def test_disabling_a_builtin_perturbation_makes_it_unknown_and_leaves_the_others(fresh, tmp_path, capsys):
    registry = create_registry(disable=["synapse_knockout"])
    perturbations = registry.contributions("perturbations")
    assert "synapse_knockout" not in perturbations and {"node_knockout", "weight_noise"} <= set(perturbations)
    assert "synapse_knockout" not in registry.plugin_names() and "local" in registry.contributions("executors")
    with pytest.raises(LesionbenchError, match="unknown perturbation 'synapse_knockout'"):
        registry.get("perturbations", "synapse_knockout")
    data = write_fashion(tmp_path / "fashion", n=20)
    study = ["demo", *run_flags(data), "--no-publish"]

    def run_without_synapse_knockout(perturbation: str, out: str) -> int:
        flags = ["--perturbations", perturbation, "--out", str(tmp_path / out)]
        return main(["-p", "no:synapse_knockout", "run", *study, *flags])

    capsys.readouterr()
    assert run_without_synapse_knockout("synapse_knockout", "off") == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("lesionbench: error:") and "unknown perturbation 'synapse_knockout'" in err and "\n" not in err
    )
    assert not (tmp_path / "off").exists()
    assert run_without_synapse_knockout("node_knockout", "on") in FINISHED
    assert set(read_results(tmp_path / "on")["perturbation"]) == {"clean", "node_knockout"}
    assert main(["list", "perturbations"]) == 0  # without -p the next command has every built-in again
    assert "synapse_knockout" in get_registry().contributions("perturbations")


def test_disabling_an_unknown_plugin_or_a_bad_switch_is_one_line(fresh, capsys):
    assert main(["-p", "no:synapse_knockot", "list", "perturbations"]) == 2
    err = capsys.readouterr().err.strip()
    assert "synapse_knockout" in err and "\n" not in err  # the closest name offered
    assert "synapse_knockout" in get_registry().contributions("perturbations")  # the registry in use is whole
    with pytest.raises(SystemExit) as info:
        main(["-p", "synapse_knockout", "list", "perturbations"])
    assert info.value.code == 2 and "-p takes no:NAME" in capsys.readouterr().err


def test_disabling_the_local_executor_leaves_ray_and_removes_local_from_the_choices(fresh, capsys):
    registry = create_registry(disable=["local"])
    assert set(registry.contributions("executors")) == {"ray"}
    from lesionbench.executors import create_executor

    with pytest.raises(LesionbenchError, match="unknown executor 'local'.*Valid: ray"):
        create_executor("local", registry=registry)
