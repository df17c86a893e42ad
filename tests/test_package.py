"""The installed package: one import name, a public surface, imports that flow one way.

lesionbench installs ``lesionbench``, ``lesionbench.plugins`` and ``lesionbench.models`` from the
repository's ``benchmark/``, ``plugins/`` and ``models/`` folders, and nothing else: a user's own
``models`` package, ``plugins`` package or ``benchmark.py`` neither breaks lesionbench nor is
hidden by it.
"""

from __future__ import annotations

import ast
import csv
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import tomllib

from conftest import (
    FINISHED,  # noqa: E402
    run_flags,
    write_fashion,
)
from toy_plugins import install_plugin

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"benchmark": "lesionbench", "plugins": "lesionbench.plugins", "models": "lesionbench.models"}


def module_files() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the package."""
    out = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps .`` of the checkout, built once for this module's tests."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = out.glob("lesionbench-*.whl")
    return found


def test_the_wheel_installs_lesionbench_as_its_only_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(top_level).decode().split() == ["lesionbench"]
        assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"lesionbench"}
        assert "lesionbench/models/weights/fashion_alexnet.pt" in names  # shipped weights
        assert "lesionbench/plugins/presets/demo.toml" in names  # and presets


def test_the_wheel_holds_every_source_module_and_nothing_else(wheel):
    """Every ``.py`` under the three folders, sub-packages included (0.2.0 shipped no cli/ nor executors/)."""
    expected = set()
    for folder, package in PACKAGE_DIRS.items():
        for path in (REPO / folder).rglob("*.py"):
            expected.add("/".join((*package.split("."), *path.relative_to(REPO / folder).parts)))
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.endswith(".py")}
        entry_points = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        assert "lesionbench = lesionbench.cli:main" in z.read(entry_points).decode()
    assert shipped == expected
    assert {"lesionbench/cli/__init__.py", "lesionbench/executors/local.py"} <= shipped


def test_the_checkout_is_what_the_tests_import():
    """However the package was installed (strict editable links, the finder, a path), each module is the file here."""
    import importlib.util

    for name, path in module_files().items():
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        assert Path(spec.origin).resolve() == path.resolve(), name


@pytest.mark.slow
def test_the_wheel_works_installed_in_a_fresh_environment(wheel, tmp_path):
    """CI's release check: the wheel, not editable, in a new virtual environment (reusing this one's torch
    through ``--system-site-packages``) runs the command line and ``lesionbench.run``."""
    env_dir = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], check=True, timeout=120
    )
    python, script = env_dir / "bin" / "python", env_dir / "bin" / "lesionbench"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(COLUMNS="200", CUDA_VISIBLE_DEVICES="")
    where = subprocess.run(
        [str(python), "-c", "import lesionbench; print(lesionbench.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert Path(where.stdout.strip()).resolve().is_relative_to(env_dir.resolve()), where.stdout + where.stderr
    helped = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "run" in helped.stdout, helped.stderr
    data = write_fashion(tmp_path / "fashion", n=20)
    cli = subprocess.run(
        [str(script), "run", "demo", *run_flags(data), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode in FINISHED, cli.stderr
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1 + 3 * 2
    code = textwrap.dedent(f"""
        import lesionbench
        frame = lesionbench.run("demo", models=["fashion_alexnet"], layers=["fc8"], levels=[0, 1], draws=1,
                                n_images=20, data={str(data)!r}, device="cpu", progress=False)
        print(len(frame), sorted(set(frame["perturbation"])))
        """)
    api = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert api.returncode == 0, api.stderr
    assert api.stdout.split()[0] == str(1 + 3 * 2)


def test_nothing_imports_the_repository_folders_by_their_own_names():
    pattern = re.compile(r"^\s*(from|import)\s+(benchmark|plugins|models)\b", re.M)
    offenders = []
    for folder in ["benchmark", "plugins", "models", "tests", "perf", "examples"]:
        for path in (REPO / folder).rglob("*.py"):
            for match in pattern.finditer(path.read_text()):
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0).strip()}")
    assert offenders == []


def _imports(path: Path, name: str) -> set[str]:
    """The lesionbench modules ``path`` imports, anywhere in it but under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lesionbench"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("lesionbench"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_import_graph_has_no_cycles():
    files = module_files()
    graph = {name: {m for m in _imports(path, name) if m in files and m != name} for name, path in files.items()}
    # a module imports its package's __init__ first; lesionbench/__init__ loads the rest lazily
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    # and the flow reads one way: nothing upstream imports the executors, the API or the CLI
    upstream = [
        "lesionbench.study",
        "lesionbench.study_schema",
        "lesionbench.plan",
        "lesionbench.applicability",
        "lesionbench.graph",
        "lesionbench.cells",
        "lesionbench.store",
        "lesionbench.memory_store",
        "lesionbench.run_rewrite",
        "lesionbench.scores",
        "lesionbench.leaderboard",
        "lesionbench.plots",
    ]
    assert set(upstream) <= set(graph), "a module of the one-way flow was renamed: update this list"
    for name in upstream:
        assert not {
            m for m in graph[name] if m.startswith(("lesionbench.executors", "lesionbench.api", "lesionbench.cli"))
        }, name
    for name in [n for n in graph if not n.startswith("lesionbench.cli")]:
        source = files[name].read_text()
        assert "import argparse" not in source and "from rich" not in source, f"{name} knows argparse or rich"


def test_no_module_is_over_400_lines():
    """A module does one job: none of benchmark/, plugins/, models/ over 400 lines (split along its seams)."""
    lines = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    assert len(lines) > 40, "the package's modules were not found"
    assert {name: n for name, n in lines.items() if n > 400} == {}


def _run_cli(args: list[str], cwd: Path, extra_path: list[Path] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="250", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "lesionbench.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_project_with_its_own_models_plugins_and_benchmark_is_not_disturbed(tmp_path):
    project = tmp_path / "project"
    for package in ("models", "plugins"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"WHOSE = 'user {package}'\n")
    (project / "models" / "mynet.py").write_text("NAME = 'the user net'\n")
    (project / "benchmark.py").write_text("raise RuntimeError('the user benchmark.py was imported')\n")
    data = write_fashion(tmp_path / "fashion", n=40)

    listing = _run_cli(["list", "models"], project, [project])
    assert listing.returncode == 0, listing.stderr
    for name in (
        "fashion_alexnet",
        "fashion_vgg",
        "fashion_resnet",
        "fashion_mobilenetv3",
        "timm:<name>",
        "torchvision:<name>",
        "efficientnet_lite0",
    ):
        assert name in listing.stdout, name
    assert "warning" not in listing.stderr

    run = _run_cli(["run", "demo", *run_flags(data), "--out", str(tmp_path / "out"), "--no-plots"], project, [project])
    assert run.returncode in FINISHED, run.stderr
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1 + 3 * 2

    code = "import lesionbench.cli, lesionbench.api; import models.mynet, models, plugins; print(models.WHOSE, plugins.WHOSE, models.mynet.NAME)"
    both = subprocess.run(
        [sys.executable, "-c", code],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(project)),
    )
    assert both.returncode == 0, both.stderr
    assert both.stdout.strip() == "user models user plugins the user net"


def test_the_readme_plugin_example_installs_and_runs(tmp_path):
    """The example package is laid out as pip installs it (its modules plus a dist-info naming the
    entry points of its own pyproject.toml) and used through the command line."""
    example = REPO / "examples" / "lesionbench-signflip"
    meta = tomllib.loads((example / "pyproject.toml").read_text())["project"]
    source = (example / "lesionbench_signflip" / "__init__.py").read_text()
    assert re.findall(r"^from (\S+) import", source, re.M) == ["__future__", "lesionbench"]  # public surface only
    site = install_plugin(
        tmp_path / "site",
        meta["name"],
        meta["entry-points"]["lesionbench"],
        {"lesionbench_signflip/__init__": source},
        version=meta["version"],
    )

    plugins = _run_cli(["plugins"], tmp_path, [site])
    line = next(l for l in plugins.stdout.splitlines() if l.strip("│ ").startswith("sign_flip"))
    assert "lesionbench-signflip 0.1.0" in line and "perturbation sign_flip" in line
    data = write_fashion(tmp_path / "fashion", n=40)
    study = tmp_path / "study.toml"
    study.write_text(
        textwrap.dedent(f"""
        models = ["fashion_alexnet"]
        layers = ["fc8"]
        perturbations = ["sign_flip"]
        draws = 2
        device = "cpu"
        [dataset]
        name = "fashion_mnist"
        path = "{data}"
        n_images = 20
        """)
    )
    run = _run_cli(["run", str(study), "--out", str(tmp_path / "out"), "--no-plots"], tmp_path, [site])
    assert run.returncode in FINISHED, run.stderr
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["perturbation"] == "sign_flip"]
    assert len(rows) == 1 + 4 * 2 and {r["level_unit"] for r in rows} == {"fraction p of weights negated"}
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert '"distribution": "lesionbench-signflip"' in manifest  # the run records what produced it
