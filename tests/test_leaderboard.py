"""Leaderboard, plots and the compare gate, on results tables made by hand or by a tiny run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionbench.cli import main
from lesionbench.compare import compare, to_markdown
from lesionbench.leaderboard import md, render
from lesionbench.plots import safe_name, write_all
from lesionbench.publish import publish
from lesionbench.store import COLUMNS

REPO = Path(__file__).resolve().parents[1]


def results(model="m", dataset="d", clean=0.9, layers=None, perts=("p",), classes=10, images_per_s=100.0):
    """A results table in the store's format; layers maps name -> list of accuracies at levels 0, .5, 1."""
    layers = layers or {"conv1": [0.9, 0.1, 0.1], "fc8": [0.9, 0.9, 0.5]}
    base = dict(model=model, dataset=dataset, seed=0, loss=1.0, n_images=100, seconds=1.0,
                images_per_s=images_per_s, device="cpu", num_classes=classes, error="", nonfinite_weights=0,
                level_axis="linear", level_unit="fraction p", nonfinite_outputs=np.nan)  # fmt: skip
    rows = [base | dict(layer="", layer_index=-1, relative_depth=np.nan, perturbation="clean", level=0.0, draw=0, top1=clean, top5=1.0)]
    for i, (layer, accs) in enumerate(layers.items()):
        for p in perts:
            for level, acc in zip((0.0, 0.5, 1.0), accs):
                for draw in range(1 if level == 0 else 2):
                    rows.append(base | dict(layer=layer, layer_index=i, relative_depth=i / max(1, len(layers) - 1),
                                            perturbation=p, level=level, draw=draw, top1=acc, top5=min(1.0, acc + 0.05)))  # fmt: skip
    return pd.DataFrame(rows)[COLUMNS]


def write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def test_render_ranks_models_and_names_the_most_fragile_layer():
    strong = results("strong", layers={"conv1": [0.9, 0.9, 0.9], "fc8": [0.9, 0.9, 0.8]})
    weak = results("weak")
    text = render(pd.concat([weak, strong], ignore_index=True))
    table = [l for l in text.splitlines() if l.startswith("| 1 ") or l.startswith("| 2 ")]
    assert "strong" in table[0] and "weak" in table[1]
    assert "Most fragile under p: **conv1** (score 0.25, critical)" in text
    assert "| conv1 | 0.00 | **0.25** (0.25) |" in text
    assert "| fc8 | 1.00 | 0.88 (1.00) |" in text


def test_overall_ranks_on_shared_perturbations_and_each_perturbation_says_where_fragility_is():
    """A model studied under more perturbations is ranked only on those every model has; the
    by-perturbation table locates the fragile layers (early vs late) for each."""
    a = results("a", perts=("p", "extra"), layers={"conv1": [0.9, 0.1, 0.1], "mid": [0.9, 0.9, 0.9], "fc8": [0.9, 0.9, 0.9]})
    b = results("b", perts=("p",), layers={"conv1": [0.9, 0.8, 0.8], "fc8": [0.9, 0.9, 0.5]})
    text = render(pd.concat([a, b], ignore_index=True))
    header = next(l for l in text.splitlines() if l.startswith("| # "))
    assert "| p |" in header and "extra" not in header
    first = next(l for l in text.splitlines() if l.startswith("| 1 "))
    assert "[b]" in first  # b's p scores beat a's; a's "extra" column does not count
    rows = {l.split(" | ")[0]: l for l in text.splitlines() if l.startswith("| extra |") or l.startswith("| p |")}
    assert rows["| extra"].startswith("| extra | 1 | 0.25 | 1.00 | 1.00 | a: conv1 (0.25) |")
    assert rows["| p"].startswith("| p | 2 |")


def test_one_table_per_track():
    text = render(pd.concat([results("a", "fashion"), results("b", "imagenet")], ignore_index=True),
                  metrics={"imagenet": "top5"})  # fmt: skip
    assert "## Track: fashion (scores from top1)" in text
    assert "## Track: imagenet (scores from top5)" in text


def test_names_are_escaped_in_markdown():
    hostile = results("evil|model](http://x)")
    text = render(hostile)
    assert "evil\\|model\\]\\(http://x\\)" in text
    assert "evil|model" not in text
    assert md("a_b*c") == "a\\_b\\*c"


def test_plot_files_cannot_escape_their_directory(tmp_path):
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert "/" not in safe_name("timm:resnet18/../x")
    df = results("../../outside")
    links = write_all(df, {}, tmp_path / "plots")
    for items in links.values():
        for _label, path in items:
            assert path.resolve().parent == (tmp_path / "plots").resolve()
            assert path.is_file() and path.stat().st_size > 10_000  # a real PNG, not an empty file
    assert not list(tmp_path.parent.glob("outside*"))


def test_publish_links_plots_relative_to_the_leaderboard(tmp_path):
    src = write(results(), tmp_path / "runs" / "a" / "results.csv")
    out = publish([src], tmp_path / "board" / "LEADERBOARD.md")
    text = out.read_text()
    assert "(plots/d__m__p.png)" in text and (tmp_path / "board" / "plots" / "d__m__p.png").is_file()
    assert "`../runs/a/results.csv`" in text


def test_committed_leaderboard_is_generated_from_committed_results(tmp_path):
    """leaderboard/LEADERBOARD.md is never edited by hand: regenerating it gives the same text."""
    committed = REPO / "leaderboard" / "LEADERBOARD.md"
    if not committed.is_file():
        pytest.skip("no committed leaderboard yet")
    copy = tmp_path / "leaderboard"
    shutil.copytree(REPO / "leaderboard" / "results", copy / "results")
    regenerated = publish([copy / "results"], copy / "LEADERBOARD.md", draw=False, title=TITLE)
    assert regenerated.read_text() == committed.read_text()


TITLE = "lesionbench leaderboard"


def test_compare_flags_only_drops_beyond_the_threshold():
    base = results()
    same = compare(base, base, 0.05)
    assert same.regressions.empty and len(same.table) == 2 + 2  # 2 layer scores + clean top-1/top-5
    worse = results(layers={"conv1": [0.9, 0.1, 0.1], "fc8": [0.9, 0.5, 0.5]})  # fc8 score 0.875 -> 0.625
    c = compare(worse, base, 0.05)
    assert list(c.regressions["what"]) == ["fc8 · p score"]
    assert compare(worse, base, 0.25).regressions.empty
    assert "❌ regression" in to_markdown(c, 0.05)
    clean_drop = compare(results(clean=0.8), base, 0.05)
    assert "clean top-1" in set(clean_drop.regressions["what"])


def test_compare_cli_exit_codes(tmp_path, capsys):
    base = write(results(), tmp_path / "base.csv")
    worse = write(results(layers={"conv1": [0.9, 0.1, 0.1], "fc8": [0.9, 0.5, 0.5]}), tmp_path / "new.csv")
    assert main(["compare", str(base), str(base)]) == 0
    assert main(["compare", str(worse), str(base), "--max-drop", "0.05"]) == 1
    out = capsys.readouterr().out
    assert "| m | d | fc8 · p score | 0.875 | 0.625 | -0.250 | ❌ regression |" in out
    assert main(["compare", str(worse), str(base), "--max-drop", "0.5"]) == 0
    assert main(["compare", str(tmp_path / "missing.csv"), str(base)]) == 2
    (tmp_path / "junk.csv").write_text("a,b\n1,2\n")
    assert main(["compare", str(tmp_path / "junk.csv"), str(base)]) == 2
    other = write(results(model="other"), tmp_path / "other.csv")
    assert main(["compare", str(other), str(base)]) == 2  # nothing in common
    err = capsys.readouterr().err
    assert err.count("lesionbench: error:") == 3


def test_leaderboard_cli_writes_markdown_and_plots(tmp_path):
    src = write(results(), tmp_path / "r" / "results.csv")
    out = tmp_path / "LB.md"
    assert main(["leaderboard", str(src), "--out", str(out)]) == 0
    assert out.read_text().startswith("# lesionbench leaderboard")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "d__m__heatmap.png", "d__m__p.png", "score_vs_depth.png",
    ]  # fmt: skip
    assert main(["leaderboard", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_results_without_a_clean_row_and_a_nan_threshold_are_refused(tmp_path):
    no_clean = write(results().query("perturbation != 'clean'"), tmp_path / "nc.csv")
    base = write(results(), tmp_path / "base.csv")
    assert main(["leaderboard", str(no_clean), "--out", str(tmp_path / "x.md"), "--no-plots"]) == 2
    assert main(["compare", str(no_clean), str(base)]) == 2
    assert main(["compare", str(base), str(base), "--max-drop", "nan"]) == 2


def test_non_finite_cells_count_as_chance_not_as_missing():
    from lesionbench.scores import layer_scores

    df = results(layers={"conv1": [0.9, 0.9, 0.9]})
    broken = (df["layer"] == "conv1") & (df["level"] == 1.0)
    df.loc[broken, "error"] = "non-finite logits"
    df.loc[broken, "loss"] = np.nan
    score = layer_scores(df).iloc[0]["score"]
    assert score == pytest.approx(0.75)  # r = 1, 1, 0 — not 1.0 from dropping the level
