"""Result files you can trust (issue 24): the results schema on every read, rows bound to their run,
a run directory that is always resumable, one-line errors instead of tracebacks, and ``verify``.

One tiny study (an untrained Fashion-MNIST AlexNet, 20 synthetic images, 2 layers × 2 levels × 1
draw) is run once; every case edits a copy of it the way the issue measured."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lesionbench
from conftest import FINISHED, write_fashion
from lesionbench.cli import main

KEY = ["model", "layer", "perturbation", "level", "draw"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, study_file) -> Path:
    """This module's study file (in place of conftest's ``study`` factory)."""
    root = tmp_path_factory.mktemp("trust")
    data = write_fashion(root / "fashion", n=40)
    return study_file(
        root / "s.toml",
        {"ref": "fashion_alexnet", "weights": "none"},
        ["conv1", "fc8"],
        "weight_noise",
        [0.5, 1.0],
        data,
        name="trust",
        seed=3,
        n_images=20,
        batch_size=20,
    )


@pytest.fixture(scope="module")
def reference(study) -> Path:
    out = study.parent / "ref"
    assert main(["run", str(study), "--out", str(out)]) in FINISHED
    return out


@pytest.fixture
def run(reference, tmp_path) -> Path:
    """A fresh copy of the reference run, to edit."""
    return Path(shutil.copytree(reference, tmp_path / "run"))


def one_line_error(capsys) -> str:
    err = [
        line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("lesionbench: warning:")
    ]
    assert len(err) == 1 and err[0].startswith("lesionbench: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def lines(run: Path) -> list[str]:
    return (run / "results.csv").read_text().splitlines()


def set_field(run: Path, row: int, field: str, value: str, rebind: bool = False) -> None:
    """Edit one field of data row ``row`` (0-based); with ``rebind``, recompute the row's checksum
    (SHA-256 over run and the other fields, written here independently of the library)."""
    text = lines(run)
    header = text[0].split(",")
    cells = text[row + 1].split(",")
    cells[header.index(field)] = value
    if rebind:
        cells[-1] = hashlib.sha256("\x1f".join([cells[-2], *cells[:-2]]).encode()).hexdigest()[:16]
    text[row + 1] = ",".join(cells)
    (run / "results.csv").write_text("\n".join(text) + "\n")


def strip_binding(run: Path) -> None:
    """Make the run a schema-1 file (as written before rows were bound), so range checks are seen alone."""
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["results_schema"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "results.csv").write_text("\n".join(",".join(line.split(",")[:-2]) for line in lines(run)) + "\n")


def perturbed_row(run: Path) -> int:
    return next(i for i, line in enumerate(lines(run)[1:]) if ",weight_noise," in line)


# ------------------------------------------------------------------ point 2: tampering is refused


def test_another_runs_results_copied_into_a_run_directory_are_refused_by_resume(run, tmp_path, study, capsys):
    other = tmp_path / "other"
    assert main(["run", str(study), "--out", str(other), "--seed", "4", "--layers", "conv1", "--no-plots"]) in FINISHED
    shutil.copy(other / "results.csv", run / "results.csv")
    capsys.readouterr()
    assert main(["run", "--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert "row 1 " in err and "field run" in err and "another run" in err
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "lb.md"), "--no-plots"]) == 2
    one_line_error(capsys)


def test_an_old_unbound_results_file_in_a_bound_run_is_refused(run, capsys):
    shutil.copy(
        Path(__file__).resolve().parents[1] / "leaderboard/results/fashion-mnist/results.csv", run / "results.csv"
    )
    assert main(["run", "--resume", str(run)]) == 2
    assert "field run/checksum: missing" in one_line_error(capsys)


@pytest.mark.parametrize("value", ["5.0", "-3"])
def test_an_accuracy_out_of_range_is_refused_not_scored(run, tmp_path, capsys, value):
    i = perturbed_row(run)
    set_field(run, i, "top1", value)
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "lb.md"), "--no-plots"]) == 2
    assert f"row {i + 1} " in (err := one_line_error(capsys)) and "field checksum" in err  # bound: the edit shows
    strip_binding(run)  # unbound (schema 1): the range itself refuses it
    assert main(["compare", str(run), str(run)]) == 2
    err = one_line_error(capsys)
    assert f"row {i + 1} (line {i + 2}" in err and "field top1" in err and repr(value) in err
    assert not (tmp_path / "lb.md").exists()


def test_top1_above_top5_and_a_missing_loss_are_refused(run, capsys):
    from lesionbench import load_results
    from lesionbench.errors import LesionbenchError

    strip_binding(run)
    i = perturbed_row(run)
    set_field(run, i, "top5", "0.0")
    with pytest.raises(LesionbenchError, match=rf"row {i + 1} .*field top1: '.*' is above top5"):
        load_results(run)
    set_field(run, i, "top5", "1.0")
    set_field(run, i, "loss", "inf")
    with pytest.raises(LesionbenchError, match=rf"row {i + 1} .*field loss: 'inf' is not a finite number"):
        load_results(run)


def test_a_duplicated_row_is_refused_not_averaged(run, capsys):
    text = lines(run)
    (run / "results.csv").write_text("\n".join(text + [text[2]]) + "\n")
    assert main(["compare", str(run), str(run)]) == 2
    assert f"row {len(text)} " in (err := one_line_error(capsys)) and "repeats the cell of row 2" in err


def test_a_torn_last_row_is_refused_on_read_and_cut_by_resume(run, reference, capsys):
    data = (run / "results.csv").read_bytes()
    (run / "results.csv").write_bytes(data[: data.rstrip(b"\n").rfind(b",") - 5])  # cut mid-row, as a crash leaves it
    assert main(["compare", str(run), str(reference)]) == 2
    assert "torn" in one_line_error(capsys)
    assert main(["run", "--resume", str(run), "--no-plots"]) in FINISHED
    assert (run / "results.csv").read_text().count("\n") == len(lines(reference))


def test_compare_fails_when_the_new_run_lacks_cells_of_the_baseline(run, reference, capsys):
    text = lines(run)
    kept = [text[0]] + [line for line in text[1:] if ",1.0," not in line.split("weight_noise")[-1][:6]]
    assert len(kept) < len(text)
    (run / "results.csv").write_text("\n".join(kept) + "\n")
    assert main(["compare", str(run), str(reference)]) == 1
    out = capsys.readouterr().out
    assert f"lacks {len(text) - len(kept)} cells the baseline has" in out
    assert main(["compare", str(reference), str(reference)]) == 0


def test_a_row_disagreeing_with_its_outcomes_is_refused(run, capsys):
    i = perturbed_row(run)
    top1 = float(lines(run)[i + 1].split(",")[lines(run)[0].split(",").index("top1")])
    set_field(run, i, "top1", repr(min(1.0, top1 + 0.05)), rebind=True)  # a checksum forged to match
    assert main(["compare", str(run), str(run)]) == 2
    err = one_line_error(capsys)
    assert "field top1" in err and "disagrees with its per-image outcomes" in err


# ------------------------------------------------------------------ point 7: one line, exit 2


def test_out_under_a_path_that_cannot_be_created_is_one_line(study, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["run", str(study), "--out", str(tmp_path / "file" / "run")]) == 2
    assert "cannot write the run directory" in one_line_error(capsys)


def test_out_on_a_read_only_file_system_is_one_line(study, capsys):
    assert main(["run", str(study), "--out", "/proc/lesionbench-run"]) == 2  # /proc takes no new directories
    assert "cannot write the run directory" in one_line_error(capsys)


def test_an_unknown_metric_in_a_manifest_is_one_line(run, tmp_path, capsys):
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["study"]["metric"] = "top7"
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["compare", str(run), str(run)]) == 2
    assert "field study.metric: 'top7' is not a metric" in one_line_error(capsys)
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "lb.md"), "--no-plots"]) == 2
    one_line_error(capsys)


def test_a_non_numeric_value_is_one_line_naming_row_and_field(run, tmp_path, capsys):
    strip_binding(run)
    set_field(run, 1, "loss", "abc")
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "lb.md"), "--no-plots"]) == 2
    assert "row 2 (line 3" in (err := one_line_error(capsys)) and "field loss: 'abc' is not a number" in err


def test_a_header_only_results_file_is_one_line(run, tmp_path, capsys):
    (run / "results.csv").write_text(lines(run)[0] + "\n")
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "lb.md"), "--no-plots"]) == 2
    assert "holds no rows" in one_line_error(capsys)
    assert main(["compare", str(run), str(run)]) == 2
    assert "holds no rows" in one_line_error(capsys)


def test_n_images_beyond_the_dataset_is_refused_in_one_line(study, tmp_path, capsys):
    assert main(["run", str(study), "--out", str(tmp_path / "r"), "--n-images", "41"]) == 2
    assert "n_images 41 is more than the 40 images" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_a_full_disk_while_plotting_is_one_line_and_resume_publishes(study, reference, tmp_path):
    import resource
    import signal

    limit = max((reference / f).stat().st_size for f in ("results.csv", "outcomes.arrow", "manifest.json")) + 1
    assert limit < max(p.stat().st_size for p in (reference / "plots").glob("*.png"))

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = tmp_path / "full"
    proc = subprocess.run(
        [sys.executable, "-m", "lesionbench.cli", "run", str(study), "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=small_disk,
    )
    err = [line for line in proc.stderr.strip().splitlines() if not line.startswith("lesionbench: warning:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "File too large" in err[0] and f"lesionbench run --resume {run}" in err[0]
    assert not (run / "LEADERBOARD.md").exists() and len(lines(run)) == len(lines(reference))
    again = subprocess.run(
        [sys.executable, "-m", "lesionbench.cli", "run", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode in FINISHED and "publishing its leaderboard" in again.stdout
    assert (run / "LEADERBOARD.md").is_file()


# ------------------------------------------------------------------ point 3: always resumable


def test_a_run_killed_while_its_directory_was_prepared_leaves_no_run_and_starts_cleanly(study, reference, tmp_path):
    staging = tmp_path / ".r.partial-99999"  # what a kill between manifest and results.csv leaves now
    staging.mkdir()
    shutil.copy(reference / "manifest.json", staging / "manifest.json")
    assert not (tmp_path / "r").exists()
    assert (
        main(["run", str(study), "--resume", str(tmp_path / "r"), "--no-plots"]) in FINISHED
    )  # the job-script form starts it
    assert not staging.exists()
    assert len(lines(tmp_path / "r")) == len(lines(reference))


def test_resume_without_a_study_never_starts_a_default_one(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "holds no run yet: name the study" in one_line_error(capsys)
    assert not (tmp_path / "nothing").exists()


def test_the_interrupt_hint_repeats_the_command_when_no_run_was_written(reference, tmp_path):
    from lesionbench.cli import _resume_hint

    assert _resume_hint(tmp_path / "none", ["run", "s.toml", "--out", "x y"]) == (
        "; nothing was written: start it again with: lesionbench run s.toml --out 'x y'"
    )
    assert _resume_hint(reference, ["run"]) == f"; finish it with: lesionbench run --resume {reference}"


def test_resume_redoes_an_interrupted_publish(run, capsys):
    (run / "LEADERBOARD.md").unlink()
    assert main(["run", "--resume", str(run), "--no-plots"]) in FINISHED
    assert "publishing its leaderboard" in capsys.readouterr().out
    assert (run / "LEADERBOARD.md").is_file()
    assert main(["run", "--resume", str(run)]) == 0
    assert "is complete: nothing to resume" in capsys.readouterr().out.replace("\n", "")


def test_cells_whose_outcomes_are_unreadable_are_evaluated_again(run, reference):
    from lesionbench.store import read_results_with_outcomes

    data = (run / "outcomes.arrow").read_bytes()
    (run / "outcomes.arrow").write_bytes(data[: len(data) // 2] + b"\0" * 64 + data[len(data) // 2 + 64 :])
    assert main(["run", "--resume", str(run), "--no-plots"]) in FINISHED
    got, got_out = read_results_with_outcomes(run)
    ref, ref_out = read_results_with_outcomes(reference)
    got, ref = got.sort_values(KEY, ignore_index=True), ref.sort_values(KEY, ignore_index=True)
    assert (got["outcome"] >= 0).all()
    pd.testing.assert_frame_equal(
        got.drop(columns=["seconds", "images_per_s", "outcome"]),
        ref.drop(columns=["seconds", "images_per_s", "outcome"]),
    )
    np.testing.assert_array_equal(got_out.top1[got["outcome"]], ref_out.top1[ref["outcome"]])


# ------------------------------------------------------------------ verify


def test_verify_accepts_a_genuine_run(reference, capsys):
    assert main(["verify", str(reference), "--sample", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert "accepted" in out and "3 cells re-run" in out and "match exactly" in out


def test_verify_rejects_a_single_edited_row_even_with_its_checksum_forged(run, capsys):
    i = perturbed_row(run)
    set_field(run, i, "loss", "0.5", rebind=True)
    assert main(["verify", str(run), "--sample", "4"]) == 1
    out = capsys.readouterr().out.replace("\n", "")
    assert "REJECTED" in out and "loss 0.5 in the file" in out


def test_verify_accepts_a_loss_that_differs_only_in_float32_rounding_and_rejects_one_beyond(run, capsys):
    """A mean loss moves in its last bits with the thread count (committed rows against a re-run here
    differed by 3e-8 relative): exact mode must not call that a forgery, but 1e-4 is one."""
    from lesionbench.store import read_results

    for i in range(len(read_results(run))):  # every row, the clean pass included, in its last bits
        loss = float(read_results(run)["loss"].iloc[i])
        set_field(run, i, "loss", repr(loss * (1 + 3e-7)), rebind=True)
    assert main(["verify", str(run), "--sample", "4"]) == 0, capsys.readouterr().out
    i = perturbed_row(run)
    loss = float(read_results(run)["loss"].iloc[i])
    set_field(run, i, "loss", repr(loss * (1 + 1e-4)), rebind=True)
    capsys.readouterr()
    assert main(["verify", str(run), "--sample", "8"]) == 1
    assert "REJECTED" in capsys.readouterr().out.replace("\n", "")


def test_verify_rejects_a_single_edited_per_image_outcome(run, capsys):
    import pyarrow as pa

    with open(run / "outcomes.arrow", "rb") as f:
        reader = pa.ipc.open_stream(f.read())
        schema, table = reader.schema, reader.read_all()
    top1 = table.column("top1").to_pylist()
    labels = json.loads(schema.metadata[b"lesionbench.subset"])["labels"]
    cell = next(i for i, p in enumerate(table.column("perturbation").to_pylist()) if p == "weight_noise")
    image = next(j for j, (c, y) in enumerate(zip(top1[cell], labels)) if c != y)  # a wrong answer: accuracy unchanged
    top1[cell][image] = next(c for c in range(10) if c not in (top1[cell][image], labels[image]))
    table = table.set_column(table.schema.get_field_index("top1"), "top1", pa.array(top1, pa.list_(pa.int32())))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in table.to_batches(max_chunksize=1):
            writer.write_batch(batch)
    (run / "outcomes.arrow").write_bytes(sink.getvalue().to_pybytes())
    assert main(["verify", str(run), "--sample", "4"]) == 1
    out = capsys.readouterr().out.replace("\n", "")
    assert "top-1 class differs on 1 of 20 images (allowed: 0)" in out


def test_the_chance_that_forged_cells_pass_is_hypergeometric():
    from scipy.stats import hypergeom

    from lesionbench.verify import pass_probability

    for n, k, sample in [(100, 1, 10), (100, 5, 20), (1190, 10, 50), (8, 8, 1), (30, 0, 30), (12, 3, 12)]:
        assert pass_probability(n, k, sample) == pytest.approx(hypergeom.pmf(0, n, k, sample), abs=1e-12)
    assert pass_probability(100, 1, 10) == pytest.approx(0.9)  # 90 of the 100 cells are left undrawn


def test_the_fault_benchmark_smoke(tmp_path):
    """A few trials of perf/faults.py (the full run is in the docs): none lost; run again with more
    trials, it reuses the reference and the trial log and runs only the new trial."""
    script = Path(__file__).resolve().parents[1] / "perf" / "faults.py"

    def bench(trials: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                str(script),
                "--trials",
                str(trials),
                "--disk-trials",
                "0",
                "--signals",
                "SIGTERM",
                "--out",
                str(tmp_path / "f"),
                "--json",
                str(tmp_path / "f.json"),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )

    first = bench(1)
    assert first.returncode == 0, first.stderr
    second = bench(2)
    assert second.returncode == 0, second.stderr
    assert "reference reused" in second.stdout and "1 of 2 trials already in" in second.stdout, second.stdout
    log = [json.loads(line) for line in (tmp_path / "f" / "trials.jsonl").read_text().splitlines()]
    assert [t["id"] for t in log] == ["SIGTERM#0", "SIGTERM#1"]
    assert all(t["lesionbench"] == lesionbench.__version__ and t["commit"] for t in log)
    summary = json.loads((tmp_path / "f.json").read_text())["summary"]
    assert summary["SIGTERM"] | {"hit": 0} == {"tried": 2, "survived": 2, "lost": 0, "hit": 0, "tracebacks": 0}
