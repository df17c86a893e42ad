"""Results-schema versions in the manifest: new runs record theirs; a run directory written before the
version was recorded (lesionbench 0.1.0's manifest and columns, made here by hand) still reads; a
version from a newer lesionbench, or one that is no version, is refused in one line (exit 2)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from lesionbench.cli import main

# lesionbench 0.1.0's results columns (benchmark/store.py at b86d86b) and the keys of its manifest
OLD_COLUMNS = [
    "model",
    "dataset",
    "layer",
    "layer_index",
    "relative_depth",
    "perturbation",
    "level",
    "draw",
    "seed",
    "top1",
    "top5",
    "loss",
    "n_images",
    "seconds",
    "images_per_s",
    "device",
    "num_classes",
    "error",
]
# (layer, layer_index, relative_depth) → top-1 at (level, draw); the clean pass scores 0.9
TOP1 = {
    ("conv1", 0, 0.0): {(0.5, 0): 0.85, (0.5, 1): 0.83, (1.0, 0): 0.60, (1.0, 1): 0.64},
    ("fc8", 7, 1.0): {(0.5, 0): 0.89, (0.5, 1): 0.88, (1.0, 0): 0.81, (1.0, 1): 0.79},
}


def old_run(path: Path, **manifest_changes) -> Path:
    """A run directory as lesionbench 0.1.0 wrote it: no results_schema, no outcomes, no binding columns."""
    path.mkdir()
    study = {
        "name": "old",
        "models": [{"ref": "fashion_alexnet"}],
        "dataset": {"name": "fashion_mnist", "split": "test", "n_images": 200},
        "perturbations": ["weight_noise"],
        "levels": {"weight_noise": [0.5, 1.0]},
        "draws": 2,
        "seed": 0,
    }
    manifest = {
        "study": study,
        "fingerprint": "0123456789abcdef",
        "lesionbench": "0.1.0",
        "torch": "2.2.0",
        "python": "3.10.12",
        "created": "2026-11-25T10:00:00+0000",
    } | manifest_changes
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    common = dict(
        model="fashion_alexnet",
        dataset="fashion_mnist",
        seed=0,
        top5=0.99,
        loss=0.5,
        n_images=200,
        seconds=0.1,
        images_per_s=2000.0,
        device="cpu",
        num_classes=10,
        error="",
    )
    rows = [
        common | dict(layer="", layer_index=-1, relative_depth="nan", perturbation="clean", level=0.0, draw=0, top1=0.9)
    ]
    for (layer, index, depth), cells in TOP1.items():
        for (level, draw), top1 in cells.items():
            rows.append(
                common
                | dict(
                    layer=layer,
                    layer_index=index,
                    relative_depth=depth,
                    perturbation="weight_noise",
                    level=level,
                    draw=draw,
                    top1=top1,
                )
            )
    with open(path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, OLD_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def one_line_error(capsys) -> str:
    err = [
        line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("lesionbench: warning:")
    ]
    assert len(err) == 1 and err[0].startswith("lesionbench: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_a_new_run_directory_records_the_results_schema_its_rows_follow(tmp_path):
    from lesionbench.schema import RESULTS_SCHEMA
    from lesionbench.store import RunDir

    with RunDir.create(tmp_path / "new", study={"name": "s"}, fingerprint="f" * 16):
        pass
    manifest = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert manifest["results_schema"] == RESULTS_SCHEMA >= 2  # 2: rows bound to their run
    assert (tmp_path / "new" / "results.csv").read_text().rstrip("\n").split(",")[-2:] == ["run", "checksum"]


def test_a_run_directory_from_before_schema_versions_still_reads(tmp_path, capsys):
    from lesionbench import load_results

    run = old_run(tmp_path / "old")
    df = load_results(run)
    assert len(df) == 1 + 8 and "run" not in df.columns and "checksum" not in df.columns
    for (layer, _, _), cells in TOP1.items():
        for (level, draw), top1 in cells.items():
            row = df[(df["layer"] == layer) & (df["level"] == level) & (df["draw"] == draw)]
            assert row["top1"].tolist() == [top1]
    assert df["flip_rate"].isna().all() and set(df["level_axis"]) == {"linear"}  # columns it lacks: their defaults
    assert main(["compare", str(run), str(run)]) == 0
    out = tmp_path / "lb.md"
    assert main(["leaderboard", str(run), "--out", str(out), "--no-plots"]) == 0
    assert "fashion\\_alexnet: conv1" in out.read_text()  # its most fragile layer: conv1 lost most
    assert json.loads((run / "manifest.json").read_text())["lesionbench"] == "0.1.0"  # read, never rewritten


def test_a_results_schema_from_a_newer_lesionbench_is_refused_in_one_line(tmp_path, capsys):
    from lesionbench.schema import RESULTS_SCHEMA

    newer = RESULTS_SCHEMA + 1
    run = old_run(tmp_path / "newer", results_schema=newer)
    out = tmp_path / "lb.md"
    assert main(["leaderboard", str(run), "--out", str(out), "--no-plots"]) == 2
    err = one_line_error(capsys)
    assert f"results_schema: {newer} is newer" in err and "upgrade" in err and "manifest.json" in err
    assert not out.exists()
    assert main(["compare", str(run), str(run)]) == 2
    assert "is newer" in one_line_error(capsys)


@pytest.mark.parametrize("version", ["2", True, 0, 1.5, None])
def test_a_results_schema_that_is_no_version_is_refused_in_one_line(tmp_path, capsys, version):
    run = old_run(tmp_path / "bad", results_schema=version)
    assert main(["compare", str(run), str(run)]) == 2
    assert f"results_schema: {version!r} is not a results schema" in one_line_error(capsys)


def test_schema_1_and_2_manifests_differ_only_in_what_their_rows_must_carry(tmp_path):
    """Declaring schema 1 explicitly is the same as declaring none; declaring 2 over unbound rows is refused."""
    from lesionbench import load_results
    from lesionbench.errors import LesionbenchError

    implicit = load_results(old_run(tmp_path / "implicit"))
    explicit = load_results(old_run(tmp_path / "explicit", results_schema=1))
    assert implicit.equals(explicit) and math.isclose(
        explicit["top1"].sum(), 0.9 + sum(map(sum, map(dict.values, TOP1.values())))
    )
    with pytest.raises(LesionbenchError, match="field run/checksum: missing"):
        load_results(old_run(tmp_path / "two", results_schema=2))
