"""Shared test fixtures and helpers.

* ``registry`` (the built-in plugins, plus a module's own ``PLUGINS``) and ``perts`` (its
  perturbations by name);
* ``fashion``: a small Fashion-MNIST ``test`` split of random images the suite makes itself
  (:func:`write_fashion` for other sizes), and :func:`run_flags`, the command line's options of a
  small CPU run on such a split;
* ``study``: a factory of study dicts for :func:`lesionbench.run` / ``parse_study``, and
  ``study_file``: the same studies written as TOML study files for the CLI (both take the test
  module's ``STUDY_DEFAULTS``);
* ``@pytest.mark.golden(path, what)``: a test that needs data the clone does not make (the installed
  Fashion-MNIST, the shared ImageNet sample). It is skipped, with the reason, where the data is
  missing, but fails loudly where the environment variable ``CI`` is set (``.ci/run`` sets it):
  a CI that silently skipped the golden tests would pass without checking anything.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from lesionbench.cli import NOT_SCORED_EXIT

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (make data)
SHARED_DATA = Path(os.environ.get("LESIONBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGENET_SAMPLE = Path(os.environ.get("LESIONBENCH_IMAGENET_SAMPLE", SHARED_DATA / "imagenet-sample"))
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

# The exit statuses of a run that finished: 0, or 3 when its model's clean accuracy is at chance and
# it is not scored (the suite's random images and untrained nets often are).
FINISHED = (0, NOT_SCORED_EXIT)


def write_fashion(root: Path, n: int = 60, labels: np.ndarray | None = None) -> Path:
    """The two IDX files the ``test`` split reads: random pixels, classes 0..9 in turn."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    if labels is None:
        labels = np.arange(n) % 10
    labels = np.asarray(labels, dtype=np.uint8)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">iii", n, 28, 28) + images.tobytes())
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">i", n) + labels.tobytes())
    return root


def run_flags(
    data: Path,
    layers: str = "fc8",
    levels: str = "0,1",
    draws: int = 1,
    perturbations: str | None = None,
    models: str = "fashion_alexnet",
    n_images: int = 20,
) -> list[str]:
    """The command line's options of a small CPU run on the Fashion-MNIST split at ``data`` (made by
    :func:`write_fashion`): ``--models … --layers … [--perturbations …] --levels … --draws …
    --n-images … --data … --device cpu``, comma-separated lists as the command line takes them."""
    chosen = ["--perturbations", perturbations] if perturbations else []
    return [
        *("--models", models, "--layers", layers, *chosen, "--levels", levels, "--draws", str(draws)),
        *("--n-images", str(n_images), "--data", str(data), "--device", "cpu"),
    ]


# ------------------------------------------------------------------------------------ golden data


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "golden(path, what, modules=()): needs data (and packages) the clone does not make: skipped "
        "where missing, failed where env CI is set",
    )
    share_the_cores()


# The test files with the longest tests (by the slowest durations of a whole serial run: 842 s,
# 2026-12-06), longest first. Collection puts them first, the rest keep their order; ``make test``
# (``--dist loadfile --no-loadscope-reorder``) gives each worker the next file when it is done with one,
# so the long files start first and no worker is left alone with one of them at the end.
LONGEST_FIRST = (
    "test_faults.py",
    "test_alexnet_baseline.py",
    "test_properties.py",
    "test_reproduce.py",
    "test_package.py",
    "test_adaptive.py",
    "test_engine.py",
    "test_bootstrap.py",
    "test_llm.py",
    "test_api.py",
    "test_result_files.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def share_the_cores() -> None:
    """Under pytest-xdist (``make test``: ``-n auto``), each worker's torch, and the ``lesionbench``
    processes its tests start, use the worker's share of the cores (at least one thread), so that N
    workers do not each start a thread per core (N × cores threads on the cores: slower than one
    worker). An ``OMP_NUM_THREADS`` set by the caller is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return
    import torch

    threads = os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // workers)))
    torch.set_num_threads(int(threads))


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("golden"):
        path, what = Path(mark.args[0]), mark.args[1]
        missing = [] if path.exists() else [f"{what} is not at {path}"]
        for module in mark.kwargs.get("modules", ()):
            try:
                __import__(module)
            except ImportError:
                missing.append(f"the package {module!r} is not installed (make setup)")
        if missing:
            why = "; ".join(missing)
            if IN_CI:
                pytest.fail(f"golden test without its data in CI (CI={os.environ['CI']}): {why}", pytrace=False)
            pytest.skip(why)


def needs_fashion_mnist() -> pytest.MarkDecorator:
    return pytest.mark.golden(FASHION_MNIST, "Fashion-MNIST (make data)")


def needs_imagenet_sample(*modules: str) -> pytest.MarkDecorator:
    return pytest.mark.golden(IMAGENET_SAMPLE, "the shared ImageNet sample (../shared/data)", modules=modules)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def registry(request: pytest.FixtureRequest):
    """The built-in plugins' registry, with the test module's own ``PLUGINS`` ((name, plugin) pairs)
    registered beside them; one per module, so a module's plugins never reach another's tests."""
    from lesionbench.registry import create_registry

    plugins = list(getattr(request.module, "PLUGINS", ()))
    return create_registry(plugins) if plugins else create_registry()


@pytest.fixture(scope="module")
def perts(registry) -> dict:
    """The registered perturbations by name."""
    return {name: c.obj for name, c in registry.contributions("perturbations").items()}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    """A Fashion-MNIST ``test`` split of 60 random images (:func:`write_fashion`)."""
    return write_fashion(tmp_path_factory.mktemp("data") / "fashion")


def make_study(
    models: str | dict | Sequence[str | dict],
    layers: Sequence[str],
    perturbations: str | Sequence[str],
    levels: Sequence[float] | dict,
    data: Path | None = None,
    *,
    name: str = "case",
    draws: int = 1,
    n_images: int = 40,
    seed: int = 0,
    **extra,
) -> dict:
    """A study as a dict: the models (a ref, a ``{"ref": …, "options": …}`` table, or a list of them),
    the layers, the perturbations (each at ``levels``, or ``levels`` by perturbation), on the CPU,
    on the Fashion-MNIST ``test`` split at ``data`` (the installed one when None); ``extra`` keys
    override or add any study option."""
    models = [models] if isinstance(models, (str, dict)) else list(models)
    perturbations = [perturbations] if isinstance(perturbations, str) else list(perturbations)
    dataset = {"name": "fashion_mnist", "n_images": n_images} | ({"path": str(data)} if data else {})
    return {
        "name": name,
        "models": [m if isinstance(m, dict) else {"ref": m} for m in models],
        "layers": list(layers),
        "perturbations": perturbations,
        "levels": dict(levels) if isinstance(levels, dict) else {p: list(levels) for p in perturbations},
        "draws": draws,
        "device": "cpu",
        "seed": seed,
        "dataset": dataset,
    } | extra


def _module_study(request: pytest.FixtureRequest) -> Callable[..., dict]:
    """:func:`make_study` with the requesting test module's ``STUDY_DEFAULTS`` as defaults."""
    defaults = dict(getattr(request.module, "STUDY_DEFAULTS", {}))
    return lambda *args, **kwargs: make_study(*args, **(defaults | kwargs))


@pytest.fixture(scope="module")
def study(request: pytest.FixtureRequest) -> Callable[..., dict]:
    """:func:`make_study`, with the test module's ``STUDY_DEFAULTS`` (a dict of its keyword
    arguments) as defaults."""
    return _module_study(request)


@pytest.fixture(scope="module")
def study_file(request: pytest.FixtureRequest) -> Callable[..., Path]:
    """``study_file(path, *args, **kwargs)``: the study of ``study(*args, **kwargs)`` (module defaults
    included) written to ``path`` as a TOML study file, for ``lesionbench run PATH``; returns ``path``."""
    import tomli_w

    make = _module_study(request)

    def write(path: Path, *args, **kwargs) -> Path:
        path.write_text(tomli_w.dumps(make(*args, **kwargs)))
        return path

    return write
