"""The plugin registry: built-ins arrive through entry points, and a third-party package installed
the ordinary way (a module plus a ``*.dist-info`` with ``entry_points.txt``) extends the harness
with no change to it. Clashes and broken plugins are reported by name without hiding the others.
"""

from __future__ import annotations

import csv
import gzip
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import lesionbench.registry as registry_mod
from conftest import FINISHED
from lesionbench.cli import main
from lesionbench.errors import LesionbenchError, PluginError
from lesionbench.registry import create_registry
from toy_plugins import install_plugin

REPO = Path(__file__).resolve().parents[1]

BUILTIN_PLUGINS = {
    "synapse_knockout",
    "node_knockout",
    "weight_noise",
    "fashion_mnist",
    "image_folder",
    "studies",
    "fashion",
    "torchvision",
    "timm",
}

SIGN_FLIP = """
import torch

from lesionbench.hookspecs import hookimpl
from lesionbench.perturbation import WeightPerturbation, count_for


class SignFlip(WeightPerturbation):
    def apply(self, layer, level, generator):
        w = layer.module.weight
        k = count_for(level, w.numel())
        if k:
            idx = torch.randperm(w.numel(), generator=generator)[:k].to(w.device)
            flat = w.view(-1)
            flat[idx] = -flat[idx]


@hookimpl
def lesionbench_perturbations():
    return [
        SignFlip(
            name="sign_flip",
            description="Negate a random fraction p of the layer's weights.",
            default_levels=(0.0, 0.5, 1.0),
            level_range=(0.0, 1.0),
        )
    ]
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh directory on sys.path; the plugin modules imported from it are forgotten afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)
    yield root
    for name in set(sys.modules) - before:
        mod = sys.modules.get(name)
        if mod is not None and str(getattr(mod, "__file__", "") or "").startswith(str(root)):
            del sys.modules[name]


# ---------------------------------------------------------------- built-ins


def test_builtins_are_loaded_from_the_import_list():
    registry = create_registry()
    assert not registry.failures, registry.failures
    assert BUILTIN_PLUGINS <= set(registry.plugin_names())
    perts = registry.contributions("perturbations")
    assert {"synapse_knockout", "node_knockout", "weight_noise"} <= set(perts)
    assert perts["synapse_knockout"].plugin == "synapse_knockout"
    assert {"fashion_mnist", "image_folder"} <= set(registry.contributions("datasets"))
    assert {"fashion", "torchvision", "timm", "efficientnet_lite"} <= set(registry.contributions("models"))
    assert {"demo", "alexnet-baseline", "timm-cnns"} <= set(registry.contributions("studies"))
    # every built-in arrives through the import list, as pytest's default plugins do
    bare = create_registry(entry_points=False, builtins=False)
    assert bare.plugin_names() == []
    assert bare.contributions("perturbations") == {}


def test_unknown_kind_and_name_are_clear_errors():
    registry = create_registry()
    with pytest.raises(LesionbenchError, match="Did you mean 'synapse_knockout'"):
        registry.get("perturbations", "synapse_knockot")
    with pytest.raises(LesionbenchError, match="unknown kind"):
        registry.contributions("optimizers")


# ---------------------------------------------------------------- a third-party plugin


def test_third_party_plugin_is_discovered_in_process(site):
    install_plugin(site, "myplug", {"myplug": "myplug"}, {"myplug": SIGN_FLIP})
    registry = create_registry()
    assert not registry.failures, registry.failures
    assert "myplug" in registry.plugin_names()
    perts = registry.contributions("perturbations")
    assert perts["sign_flip"].plugin == "myplug"
    assert perts["sign_flip"].description.startswith("Negate")
    # the built-ins are still all there beside it
    assert {"synapse_knockout", "node_knockout", "weight_noise"} <= set(perts)


def test_third_party_plugin_perturbs_and_is_restored(site):
    import torch
    from torch import nn

    from lesionbench.graph import discover_layers
    from lesionbench.perturbation import generator_for, model_checksum, perturbed

    install_plugin(site, "myplug", {"myplug": "myplug"}, {"myplug": SIGN_FLIP})
    flip = create_registry().get("perturbations", "sign_flip")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    layer = discover_layers(model, torch.zeros(1, 4))[0]
    before = layer.module.weight.detach().clone()
    checksum = model_checksum(model)
    with perturbed(layer, flip, 1.0, generator_for(1)):
        assert torch.equal(layer.module.weight, -before)
    assert model_checksum(model) == checksum


def _write_fashion(root: Path, n: int = 60) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">iii", n, 28, 28) + images.tobytes())
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">i", n) + labels.tobytes())


def _cli(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "250"
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return subprocess.run(
        [sys.executable, "-m", "lesionbench.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_third_party_plugin_through_the_cli_subprocess(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "myplug", {"myplug": "myplug"}, {"myplug": SIGN_FLIP})
    data = tmp_path / "fashion"
    _write_fashion(data)
    study = tmp_path / "study.toml"
    study.write_text(
        textwrap.dedent(
            f"""
            name = "tiny"
            models = [{{ref = "fashion_alexnet", weights = "none"}}]
            layers = ["conv1", "fc8"]
            draws = 2
            device = "cpu"

            [dataset]
            name = "fashion_mnist"
            path = "{data}"
            n_images = 40
            """
        )
    )

    plugins = _cli(["plugins"], site, tmp_path)
    assert plugins.returncode == 0, plugins.stderr
    line = next(l for l in plugins.stdout.splitlines() if "myplug" in l)
    assert "perturbation sign_flip" in line

    listing = _cli(["list", "perturbations"], site, tmp_path)
    assert listing.returncode == 0, listing.stderr
    line = next(l for l in listing.stdout.splitlines() if "sign_flip" in l)
    assert "myplug" in line

    out = tmp_path / "out"
    run = _cli(["run", str(study), "--perturbations", "sign_flip", "--out", str(out), "--no-plots"], site, tmp_path)
    assert run.returncode in FINISHED, run.stderr
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    flips = [r for r in rows if r["perturbation"] == "sign_flip"]
    # per layer: level 0 once, then 2 draws at each of 0.5 and 1.0
    assert len(flips) == 2 * (1 + 2 + 2)
    assert {r["layer"] for r in flips} == {"conv1", "fc8"}
    assert {float(r["level"]) for r in flips} == {0.0, 0.5, 1.0}
    assert all(r["error"] == "" for r in flips)
    assert {r["perturbation"] for r in rows} == {"clean", "sign_flip"}
    (clean,) = [r for r in rows if r["perturbation"] == "clean"]
    # negating every weight of fc8 negates its weight term: the loss must move
    fc8_full = [r for r in flips if r["layer"] == "fc8" and float(r["level"]) == 1.0]
    assert fc8_full and all(float(r["loss"]) != float(clean["loss"]) for r in fc8_full)


# ---------------------------------------------------------------- clashes and failures


DUPLICATE_SYNAPSE = """
from lesionbench.hookspecs import hookimpl
from lesionbench.plugins.synapse_knockout import SynapseKnockout


@hookimpl
def lesionbench_perturbations():
    return [SynapseKnockout(name="synapse_knockout", description="again", default_levels=(0.0,),
                            level_range=(0.0, 1.0))]
"""


def test_duplicate_name_from_two_third_party_plugins_names_both(site):
    install_plugin(site, "plug_a", {"plug_a": "plug_a"}, {"plug_a": SIGN_FLIP})
    install_plugin(site, "plug_b", {"plug_b": "plug_b"}, {"plug_b": SIGN_FLIP})
    registry = create_registry()
    with pytest.raises(PluginError) as info:
        registry.contributions("perturbations")
    message = str(info.value)
    assert "sign_flip" in message
    assert "'plug_a'" in message and "'plug_b'" in message
    # other kinds are unaffected by the clash
    assert "fashion_mnist" in registry.contributions("datasets")


def test_duplicate_of_a_builtin_names_both_and_cli_exits_2(site, monkeypatch, capsys):
    install_plugin(site, "dupe", {"dupe": "dupe"}, {"dupe": DUPLICATE_SYNAPSE})
    with pytest.raises(PluginError) as info:
        create_registry().contributions("perturbations")
    assert "'synapse_knockout'" in str(info.value) and "'dupe'" in str(info.value)

    monkeypatch.setattr(registry_mod, "_default", None)  # the CLI builds its registry afresh
    assert main(["list", "perturbations"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesionbench: error: duplicate perturbation name 'synapse_knockout'")
    assert "'dupe'" in err and "\n" not in err


def test_duplicate_via_direct_registration_names_both():
    from lesionbench.hookspecs import hookimpl

    class Shared:
        name, description, default_path = "shared", "a dataset two plugins both call 'shared'", None

        def load(self, path, split):
            raise NotImplementedError

    class One:
        @hookimpl
        def lesionbench_datasets(self):
            return [Shared()]

    class Two:
        @hookimpl
        def lesionbench_datasets(self):
            return [Shared()]

    registry = create_registry([("one", One()), ("two", Two())], entry_points=False, builtins=False)
    with pytest.raises(PluginError, match=r"'shared'.*'(one|two)'.*'(one|two)'"):
        registry.contributions("datasets")


def test_entry_point_name_taken_by_another_distribution_is_reported(site):
    """A third-party entry point that reuses a built-in's name must not vanish without a word."""
    install_plugin(site, "myplug", {"weight_noise": "myplug"}, {"myplug": SIGN_FLIP})
    registry = create_registry()
    clashes = [f for f in registry.failures if f.plugin == "weight_noise"]
    assert len(clashes) == 1, registry.failures
    assert clashes[0].stage == "load" and "already registered" in clashes[0].message
    # exactly one of the two modules holds the name; the other is the reported failure
    perts = set(registry.contributions("perturbations"))
    assert len({"sign_flip", "weight_noise"} & perts) == 1
    assert {"synapse_knockout", "node_knockout"} <= perts


BROKEN_IMPORT = """
raise RuntimeError("boom while importing")
"""

BROKEN_HOOK = """
from lesionbench.hookspecs import hookimpl


class Source:
    name = "kept_dataset"
    description = "contributed by a plugin whose other hook is broken"
    default_path = None

    def load(self, path, split):
        raise NotImplementedError


@hookimpl
def lesionbench_perturbations():
    raise ValueError("hook exploded")


@hookimpl
def lesionbench_datasets():
    return [Source()]
"""


def test_plugin_failing_on_import_is_reported_and_others_load(site):
    install_plugin(site, "broken", {"broken_plug": "broken_mod"}, {"broken_mod": BROKEN_IMPORT})
    install_plugin(site, "myplug", {"myplug": "myplug"}, {"myplug": SIGN_FLIP})
    registry = create_registry()
    failures = [f for f in registry.failures if f.plugin == "broken_plug"]
    assert len(failures) == 1
    assert failures[0].stage == "load"
    assert "boom while importing" in failures[0].message
    assert "broken_plug" in str(failures[0])
    assert "broken_plug" not in registry.plugin_names()
    perts = registry.contributions("perturbations")
    assert {"sign_flip", "synapse_knockout", "node_knockout", "weight_noise"} <= set(perts)
    assert "fashion_mnist" in registry.contributions("datasets")


def test_plugin_whose_hook_raises_is_reported_and_others_remain(site):
    install_plugin(site, "halfbroken", {"halfbroken": "halfbroken_mod"}, {"halfbroken_mod": BROKEN_HOOK})
    install_plugin(site, "myplug", {"myplug": "myplug"}, {"myplug": SIGN_FLIP})
    registry = create_registry()
    assert registry.failures == []  # it imported fine
    perts = registry.contributions("perturbations")
    assert {"sign_flip", "synapse_knockout", "node_knockout", "weight_noise"} <= set(perts)
    failures = [f for f in registry.failures if f.plugin == "halfbroken"]
    assert len(failures) == 1
    assert failures[0].stage == "lesionbench_perturbations"
    assert "ValueError" in failures[0].message and "hook exploded" in failures[0].message
    # its working hook still contributes, beside the built-ins
    datasets = registry.contributions("datasets")
    assert datasets["kept_dataset"].plugin == "halfbroken"
    assert "fashion_mnist" in datasets


def test_contribution_without_a_name_is_refused_in_one_line_naming_plugin_and_field():
    from lesionbench.hookspecs import hookimpl
    from lesionbench.study import StudyPreset

    class Nameless:
        @hookimpl
        def lesionbench_studies(self):
            return [object(), StudyPreset("kept", "a good one", "")]

    registry = create_registry([("nameless", Nameless())], entry_points=False, builtins=False)
    assert list(registry.contributions("studies")) == ["kept"]  # the broken one hurts only itself
    (failure,) = registry.failures
    assert str(failure) == (
        "plugin 'nameless' failed during lesionbench_studies: contributed a study that breaks "
        "the contract: it has no field 'name'"
    )


MISSING_LEVELS = """
from dataclasses import dataclass

from lesionbench import hookimpl


class NoLevels:  # duck-typed, and missing default_levels
    kind = "weights"
    name, description, level_range, identity_level = "no_levels", "forgot its levels", (0.0, 1.0), 0.0

    def apply(self, layer, level, generator):
        pass


@hookimpl
def lesionbench_perturbations():
    return [NoLevels()]
"""

MISSPELLED_HOOK = """
from lesionbench import hookimpl


@hookimpl
def lesionbench_perturbation():  # no trailing s
    return []
"""


def test_contribution_missing_a_field_is_refused_by_the_cli_in_one_line(site, monkeypatch, capsys):
    install_plugin(site, "nolevels", {"nolevels": "nolevels"}, {"nolevels": MISSING_LEVELS})
    registry = create_registry()
    perturbations = registry.contributions("perturbations")
    assert "no_levels" not in perturbations and "synapse_knockout" in perturbations
    (failure,) = [f for f in registry.failures if f.plugin == "nolevels"]
    assert "'no_levels'" in failure.message and "no field 'default_levels'" in failure.message
    with pytest.raises(PluginError, match="plugin 'nolevels'.*'no_levels'.*no field 'default_levels'"):
        registry.get("perturbations", "no_levels")
    monkeypatch.setattr(registry_mod, "_default", None)
    assert main(["run", "demo", "--perturbations", "no_levels", "--out", str(site / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nolevels" in err and "default_levels" in err and "\n" not in err
    assert not (site / "never").exists()


def test_misspelled_hook_is_reported_by_plugin_name(site):
    install_plugin(site, "typo", {"typo": "typo_mod"}, {"typo_mod": MISSPELLED_HOOK})
    registry = create_registry()
    (failure,) = [f for f in registry.failures if f.plugin == "typo"]
    assert (
        "lesionbench_perturbation" in failure.message and "did you mean 'lesionbench_perturbations'" in failure.message
    )
    assert "typo" not in registry.plugin_names()  # refused, the rest loads
    assert "synapse_knockout" in registry.contributions("perturbations")


def test_plugins_command_shows_failures_by_name(site, monkeypatch, capsys):
    from rich.console import Console

    import lesionbench.cli as cli

    install_plugin(site, "broken", {"broken_plug": "broken_mod"}, {"broken_mod": BROKEN_IMPORT})
    install_plugin(site, "halfbroken", {"halfbroken": "halfbroken_mod"}, {"halfbroken_mod": BROKEN_HOOK})
    monkeypatch.setattr(registry_mod, "_default", None)
    monkeypatch.setattr(cli, "console", Console(width=250))
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    broken = [l for l in lines if "broken_plug" in l]
    assert broken and "failed" in broken[0] and "boom while importing" in broken[0]
    half = [l for l in lines if "halfbroken" in l]
    assert any("failed" in l and "hook exploded" in l for l in half)
    assert any("dataset kept_dataset" in l for l in half)  # its good hook is still listed
    assert any("synapse_knockout" in l and "perturbation synapse_knockout" in l for l in lines)


BUGGY_MODEL = """
from lesionbench import hookimpl


class Source:
    name, description = "buggy", "a model source with a bug"

    def claims(self, arch):
        return arch == "buggy_net"

    def examples(self):
        return ["buggy_net"]

    def build(self, spec):
        return {}["no such key"]  # the plugin's own bug


@hookimpl
def lesionbench_models():
    return [Source()]
"""


def test_a_plugins_own_bug_is_one_line_naming_it_with_the_traceback_kept(site, monkeypatch, capsys, tmp_path):
    install_plugin(site, "buggy", {"buggy": "buggy_mod"}, {"buggy_mod": BUGGY_MODEL})
    monkeypatch.setattr(registry_mod, "_default", None)
    assert main(["run", "demo", "--models", "buggy_net", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    found = re.match(
        r"lesionbench: error: plugin 'buggy' failed while building model 'buggy_net': KeyError: "
        r"'no such key' \(traceback in (\S+)\)$",
        err,
    )
    assert found, err
    assert 'return {}["no such key"]' in Path(found.group(1)).read_text()  # where the bug is
    assert not (tmp_path / "never").exists()
