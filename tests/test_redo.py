"""``lesionbench run --resume DIR --redo P`` (issue 22, item 5): after a perturbation's definition
changed, only its cells are evaluated again; every other row and per-image outcome stays as it was.

A tiny study (an untrained Fashion-MNIST AlexNet, 20 synthetic images, two perturbations) is run
once; the "stale" run is a copy whose ``weight_noise`` rows were damaged the way an old definition
would have left them (other numbers, other outcomes); redoing ``weight_noise`` must give back the
rows of a fresh run with the current code."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import FINISHED, write_fashion
from lesionbench.cli import main

KEY = ["model", "layer", "perturbation", "level", "draw"]
TIMING = ["seconds", "images_per_s", "checksum"]  # wall-clock (and the checksum over them): differ between any two runs


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, study_file) -> Path:
    root = tmp_path_factory.mktemp("redo")
    data = write_fashion(root / "fashion", n=40)
    study = study_file(
        root / "s.toml",
        {"ref": "fashion_alexnet", "weights": "none"},
        ["conv1", "fc8"],
        ["weight_noise", "synapse_knockout"],
        {"weight_noise": [0.5, 1.0], "synapse_knockout": [0.5]},
        data,
        name="redo",
        draws=2,
        seed=3,
        n_images=20,
        batch_size=20,
    )
    assert main(["run", str(study), "--out", str(root / "fresh"), "--no-publish"]) in FINISHED
    return root / "fresh"


def batches(run: Path) -> dict[tuple, tuple[list, list]]:
    """Each cell's per-image outcomes, read with pyarrow alone (the last batch of a cell wins)."""
    table = pa.ipc.open_stream(pa.py_buffer((run / "outcomes.arrow").read_bytes())).read_all().to_pylist()
    return {tuple(r[k] for k in KEY): (r["top1"], r["top5"]) for r in table}


def rows(run: Path) -> dict[tuple, dict]:
    import csv

    with open(run / "results.csv", newline="") as f:
        return {
            (r["model"], r["layer"], r["perturbation"], float(r["level"]), int(r["draw"])): r for r in csv.DictReader(f)
        }


def stale_copy(fresh: Path, where: Path) -> Path:
    """A copy of ``fresh`` whose weight_noise rows and outcome batches say something else."""
    run = Path(shutil.copytree(fresh, where))
    lines = (run / "results.csv").read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    col = header.index("top1")
    out = [lines[0]]
    for line in lines[1:]:
        cells = line.rstrip("\n").split(",")
        if cells[header.index("perturbation")] == "weight_noise":  # checksum recomputed: SHA-256 of run + fields
            cells[col] = "0.0"
            cells[-1] = hashlib.sha256("\x1f".join([cells[-2], *cells[:-2]]).encode()).hexdigest()[:16]
        out.append(",".join(cells) + "\n")
    (run / "results.csv").write_text("".join(out))
    table = pa.ipc.open_stream(pa.py_buffer((run / "outcomes.arrow").read_bytes())).read_all()
    noise = [r for r in table.to_pylist() if r["perturbation"] == "weight_noise"]
    with open(run / "outcomes.arrow", "ab") as f:  # a later batch of the same cell is what readers take
        sink = pa.BufferOutputStream()
        writer = pa.ipc.new_stream(sink, table.schema)
        for r in noise:
            r["top1"] = [(t + 1) % 10 for t in r["top1"]]
            writer.write_batch(pa.RecordBatch.from_pylist([r], schema=table.schema))
        body = sink.getvalue().to_pybytes()
        schema_len = len(table.schema.serialize().to_pybytes())
        f.write(body[schema_len:])  # batches only: the file already has its schema
    return run


def test_redo_gives_a_fresh_runs_rows_and_leaves_the_others_bit_identical(fresh, tmp_path):
    run = stale_copy(fresh, tmp_path / "run")
    before_rows, before_batches = rows(run), batches(run)
    noise = {k for k in before_rows if k[2] == "weight_noise"}
    assert noise and all(before_rows[k]["top1"] == "0.0" for k in noise)  # the copy is stale
    assert main(["run", "--resume", str(run), "--redo", "weight_noise", "--no-publish"]) in FINISHED
    after_rows, after_batches, reference = rows(run), batches(run), rows(fresh)
    assert len((run / "results.csv").read_text().splitlines()) == len((fresh / "results.csv").read_text().splitlines())
    assert after_rows.keys() == reference.keys()
    for k, row in after_rows.items():
        if k in noise:  # evaluated again: what a fresh run with this code writes
            assert {c: v for c, v in row.items() if c not in TIMING} == {
                c: v for c, v in reference[k].items() if c not in TIMING
            }
            assert after_batches[k] == batches(fresh)[k] != before_batches[k]
        else:  # untouched, to the byte
            assert row == before_rows[k] and after_batches[k] == before_batches[k]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recomputed"][0]["perturbations"] == ["weight_noise"]
    assert manifest["recomputed"][0]["cells"] == len(noise)
    assert "redo weight_noise" in (run / "run.log").read_text()


def test_redo_of_a_perturbation_outside_the_study_is_one_line_and_changes_nothing(fresh, tmp_path, capsys):
    run = Path(shutil.copytree(fresh, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "run.log"}
    assert main(["run", "--resume", str(run), "--redo", "node_knockout", "--no-publish"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "node_knockout" in err[0] and "Traceback" not in err[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "run.log"} == before
    assert main(["run", "--out", str(tmp_path / "new"), "--redo", "weight_noise"]) == 2
    assert "--redo needs --resume" in capsys.readouterr().err
