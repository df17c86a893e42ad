"""The README, the CI workflow it shows, and the documentation site: built with warnings as errors, and
(as datasette's documentation tests do) every hook, command, flag, study option and public name in it."""

from __future__ import annotations

import argparse
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
WORKFLOW = REPO / ".github" / "workflows" / "lesionbench-gate.yml"


def test_the_readme_is_at_most_12_kb():
    assert len(README.read_bytes()) <= 12 * 1024


def test_every_relative_link_and_image_of_the_readme_exists():
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")]
    assert len(local) >= 10  # the figure and the links into the docs
    assert [t for t in local if not (REPO / t).exists()] == []
    assert any(t.endswith(".png") for t in local)


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_readme_shows_the_committed_workflow_and_it_is_a_valid_github_workflow(tmp_path):
    text = README.read_text()
    shown = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert shown == WORKFLOW.read_text()
    checked = _validate(WORKFLOW)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "broken.yml"  # the schema check can fail: a job without runs-on is not a workflow
    broken.write_text(WORKFLOW.read_text().replace("    runs-on: ubuntu-24.04\n", ""))
    assert _validate(broken).returncode != 0


def test_the_workflow_compares_against_a_baseline_that_exists():
    text = WORKFLOW.read_text()
    baseline = re.search(r"lesionbench compare runs/pr (\S+)", text).group(1)
    assert (REPO / baseline / "results.csv").is_file()
    assert "shell: bash" in text  # pipefail: tee keeps compare's exit status


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv1(x)).flatten(1))


def test_the_readme_python_quick_start_runs_as_written(capsys):
    code = re.search(r"## Quick start 2.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def evaluation(model):
        seen.append(float(model.conv1.weight.eq(0).float().mean()))

    images = torch.randn(24, 1, 4, 4)
    with torch.no_grad():
        labels = net(images).argmax(1)  # the net's own answers: clean accuracy 1, beyond chance, so it is scored
    scope = {"my_net": net, "images": images, "labels": labels, "my_own_evaluation": evaluation}
    exec(compile(code, "README.md", "exec"), scope)
    scores = scope["lesionbench"].layer_scores(scope["df"])
    assert set(scores["layer"]) == {"conv1", "fc"} and set(scores["model"]) == {"mynet"}
    assert 0.6 <= seen[0] <= 0.8  # 70% of conv1's weights zeroed inside the block
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # and restored after it


# --------------------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``sphinx-build -E -W`` of docs/ into a temporary folder, the leaderboard from a small real run."""
    import lesionbench
    from lesionbench.publish import publish

    root = tmp_path_factory.mktemp("site")
    torch.manual_seed(0)
    net = _Net()
    lesionbench.run(
        model={"mynet": net},
        data=(torch.randn(24, 1, 4, 4), torch.arange(24) % 3),
        out=root / "run",
        perturbations=["synapse_knockout"],
        levels=[0.0, 1.0],
        draws=1,
        device="cpu",
        progress=False,
    )
    publish([root / "run"], root / "leaderboard" / "LEADERBOARD.md")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-E",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-D",
            f"lesionbench_leaderboard={root / 'leaderboard'}",
            str(REPO / "docs"),
            str(root / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return root / "html"


def _text(page: Path) -> str:
    raw = re.sub(r"<(script|style).*?</\1>", "", page.read_text(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", raw)))


def test_every_hook_is_documented(site):
    from lesionbench import hookspecs

    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "lesionbench_spec")]
    assert len(hooks) >= 4
    page = (site / "reference" / "hooks.html").read_text()
    for name in hooks:
        assert f'id="lesionbench.hookspecs.{name}"' in page, name
        first_line = getattr(hookspecs, name).__doc__.strip().splitlines()[0]
        assert html.escape(first_line, quote=False).split(":class:")[0][:30] in page, name


def test_every_command_and_flag_is_documented(site):
    from lesionbench.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    page = (site / "reference" / "cli.html").read_text()
    text = _text(site / "reference" / "cli.html")
    assert {"run", "plan", "list", "plugins", "leaderboard", "compare", "train"} <= set(sub.choices)
    for name, command in sub.choices.items():
        assert f'id="lesionbench-{name}"' in page, name
        section = text.split(f"lesionbench {name} [")[1]
        for action in command._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in section, f"{name} {flag}"


def test_every_study_option_is_documented_with_its_help(site):
    from lesionbench.study import DatasetSpec, Study, option_fields

    text = _text(site / "reference" / "study-options.html").replace("‘", "'").replace("’", "'")  # Sphinx's quotes
    for cls, prefix in ((Study, ""), (DatasetSpec, "dataset.")):
        for f in option_fields(cls):
            assert f" {prefix}{f.name} " in text, f.name
            assert f.metadata["help"] in text, f.name


def test_every_public_name_is_in_the_api_reference(site):
    import lesionbench

    page = (site / "reference" / "api.html").read_text()
    assert [name for name in lesionbench.__all__ if f'id="lesionbench.{name}"' not in page] == []


def test_the_leaderboard_and_its_model_pages_are_part_of_the_site(site):
    board = site / "results" / "board" / "LEADERBOARD.html"
    links = re.findall(r'href="(models/[^"#]+\.html)"', board.read_text())
    assert links and all((board.parent / link).is_file() for link in links)
    assert re.search(r'<img[^>]+src="[^"]*headline\.png"', board.read_text())
