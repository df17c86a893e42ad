"""Leaderboard, plots and the compare gate, on results tables made by hand or by a tiny run."""

from __future__ import annotations

import re
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
    base = dict(
        model=model,
        dataset=dataset,
        seed=0,
        loss=1.0,
        n_images=100,
        seconds=1.0,
        images_per_s=images_per_s,
        device="cpu",
        num_classes=classes,
        error="",
        nonfinite_weights=0,
        level_axis="linear",
        level_unit="fraction p",
        nonfinite_outputs=np.nan,
        flip_rate=np.nan,
    )
    rows = [
        base
        | dict(
            layer="",
            layer_index=-1,
            relative_depth=np.nan,
            perturbation="clean",
            level=0.0,
            draw=0,
            top1=clean,
            top5=1.0,
        )
    ]
    for i, (layer, accs) in enumerate(layers.items()):
        for p in perts:
            for level, acc in zip((0.0, 0.5, 1.0), accs):
                for draw in range(1 if level == 0 else 2):
                    rows.append(
                        base
                        | dict(
                            layer=layer,
                            layer_index=i,
                            relative_depth=i / max(1, len(layers) - 1),
                            perturbation=p,
                            level=level,
                            draw=draw,
                            top1=acc,
                            top5=min(1.0, acc + 0.05),
                        )
                    )
    return pd.DataFrame(rows).reindex(columns=COLUMNS)  # columns a row does not give (chance_top1…): NaN


def cells(text: str) -> list[list[str]]:
    """Every Markdown table row of ``text`` as its stripped cells (padding and rules left out)."""
    out = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def row_starting(text: str, *first: str) -> list[str]:
    """The one table row whose first cells are ``first``."""
    found = [r for r in cells(text) if r[: len(first)] == list(first)]
    assert len(found) == 1, (first, found)
    return found[0]


def write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def test_render_ranks_models_and_names_the_most_fragile_layer():
    strong = results("strong", layers={"conv1": [0.9, 0.9, 0.9], "fc8": [0.9, 0.9, 0.8]})
    weak = results("weak")
    text = render(pd.concat([weak, strong], ignore_index=True))
    assert "strong" in row_starting(text, "1")[1] and "weak" in row_starting(text, "2")[1]
    # levels 0, 0.5, 1: scores rescaled from the grid's floor 0.25 (r = 1, 0, 0) to 1
    assert "Most fragile under p: **conv1** (score 0.00, critical)" in text  # r = 1, 0, 0
    weak_section = text.split("### weak")[1]
    assert row_starting(weak_section, "conv1", "0.00") == ["conv1", "0.00", "**0.00**", "0.25"]
    assert row_starting(weak_section, "fc8", "1.00") == ["fc8", "1.00", "0.83", "1.00"]  # (0.875 − 0.25) / 0.75


def test_overall_ranks_on_shared_perturbations_and_each_perturbation_says_where_fragility_is():
    """A model studied under more perturbations is ranked only on those every model has; the
    by-perturbation table locates the fragile layers (early vs late) for each."""
    a = results(
        "a", perts=("extra",), layers={"conv1": [0.9, 0.1, 0.1], "mid": [0.9, 0.9, 0.9], "fc8": [0.9, 0.9, 0.9]}
    )
    a_p = results("a", perts=("p",), layers={"conv1": [0.9, 0.9, 0.9], "mid": [0.9, 0.9, 0.9], "fc8": [0.9, 0.9, 0.5]})
    b = results("b", perts=("p",), layers={"conv1": [0.9, 0.8, 0.8], "fc8": [0.9, 0.9, 0.5]})
    text = render(pd.concat([a, a_p.query("perturbation != 'clean'"), b], ignore_index=True))
    header = row_starting(text, "#")
    assert "p" in header and "extra" not in header
    first = row_starting(text, "1")
    assert "[a]" in first[1]  # a's p scores beat b's; a's collapse under "extra" does not count
    # a's weakest layer is its weakest under p (fc8), not conv1 under "extra", which b was not run under
    assert row_starting(text, "1")[header.index("weakest layer")] == "fc8 (0.83, p)"
    assert "Not ranked — not run on every model: extra." in text
    assert row_starting(text, "extra", "1") == ["extra", "1", "0.00", "1.00", "1.00", "a: conv1 (0.00)"]
    assert row_starting(text, "p", "2")[:2] == ["p", "2"]


def test_one_table_per_track():
    text = render(
        pd.concat([results("a", "fashion"), results("b", "imagenet")], ignore_index=True), metrics={"imagenet": "top5"}
    )
    assert "## Track: fashion — scores from top1" in text
    assert "## Track: imagenet — scores from top5" in text


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


def test_publish_opens_with_the_ranked_tables_and_figure_and_gives_each_model_a_page(tmp_path):
    """The first screen is each track's ranked table with its headline figure; a model's layer tables and
    plot links are on its own page, every link relative to the file that holds it."""
    two = pd.concat(
        [results("m"), results("n", layers={"conv1": [0.9, 0.5, 0.1], "fc8": [0.9, 0.2, 0.1]})], ignore_index=True
    )
    src = write(two, tmp_path / "runs" / "a" / "results.csv")
    out = publish([src], tmp_path / "board" / "LEADERBOARD.md")
    text = out.read_text()
    sections = text.split("\n## ")
    assert sections[1].startswith("Track:") and sections[2].startswith("How to read")
    ranked = sections[1]
    assert ranked.index("| #") < ranked.index("![")  # the ranked table, then the figure, before anything else
    figure = re.search(r"!\[[^]]*\]\(([^)]+)\)", ranked).group(1)
    assert (out.parent / figure).is_file() and (out.parent / figure).stat().st_size > 10_000
    for model in ("m", "n"):
        link = re.search(rf"\[{model}\]\((models/[^)]+\.md)\)", ranked).group(1)
        page = (out.parent / link).read_text()
        assert page.startswith(f"# {model} — d") and "### " not in text.split(f"[{model}]")[0]
        assert "](../LEADERBOARD.md)" in page and f"](../plots/d__{model}__p.png)" in page
        assert (out.parent / "plots" / f"d__{model}__p.png").is_file()
        assert "| layer" in page and "| layer" not in text.split("## How to read")[1].split("## Details")[0]
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
    worse = results(layers={"conv1": [0.9, 0.1, 0.1], "fc8": [0.9, 0.5, 0.5]})  # fc8 score 0.833 -> 0.5
    c = compare(worse, base, 0.05)
    assert list(c.regressions["what"]) == ["fc8 · p score"]
    assert compare(worse, base, 0.35).regressions.empty
    assert "❌ regression" in to_markdown(c, 0.05)
    clean_drop = compare(results(clean=0.8), base, 0.05)
    assert "clean top-1" in set(clean_drop.regressions["what"])


def test_compare_cli_exit_codes(tmp_path, capsys):
    base = write(results(), tmp_path / "base.csv")
    worse = write(results(layers={"conv1": [0.9, 0.1, 0.1], "fc8": [0.9, 0.5, 0.5]}), tmp_path / "new.csv")
    assert main(["compare", str(base), str(base)]) == 0
    assert main(["compare", str(worse), str(base), "--max-drop", "0.05"]) == 1
    out = capsys.readouterr().out
    # r = 1, 1, 0.5 → (0.875 − 0.25) / 0.75; r = 1, 0.5, 0.5 → 0.5 (the grid's floor is 0.25)
    assert row_starting(out, "m", "d", "fc8 · p score") == [
        "m",
        "d",
        "fc8 · p score",
        "0.833",
        "0.500",
        "-0.333",
        "robust",
        "❌ regression",
    ]
    assert "the threshold alone decides" in out  # tables without per-image outcomes
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
        "d__headline.png",
        "d__m__heatmap.png",
        "d__m__p.png",
        "score_vs_depth.png",
    ]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["d--m.md"]
    assert main(["leaderboard", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_results_without_a_clean_row_and_a_nan_threshold_are_refused(tmp_path):
    no_clean = write(results().query("perturbation != 'clean'"), tmp_path / "nc.csv")
    base = write(results(), tmp_path / "base.csv")
    assert main(["leaderboard", str(no_clean), "--out", str(tmp_path / "x.md"), "--no-plots"]) == 2
    assert main(["compare", str(no_clean), str(base)]) == 2
    assert main(["compare", str(base), str(base), "--max-drop", "nan"]) == 2


def test_non_finite_cells_are_scored_as_measured_not_dropped():
    """A cell whose logits held NaN/Inf keeps its measured accuracy (its NaN images counted wrong by the
    evaluation): all-NaN scores 0 retention instead of vanishing from the curve; a transient fault that
    hit a few images keeps the accuracy of the rest."""
    from lesionbench.scores import layer_scores

    df = results(layers={"conv1": [0.9, 0.9, 0.9]})
    broken = (df["layer"] == "conv1") & (df["level"] == 1.0)
    df.loc[broken, ["error", "loss", "top1"]] = ["non-finite logits", np.nan, 0.0]  # every image NaN
    floor = 0.25  # the area of r = 1, 0, 0 over levels 0, 0.5, 1: the scores are rescaled from it to 1
    assert layer_scores(df).iloc[0]["score"] == pytest.approx(
        (0.75 - floor) / (1 - floor)
    )  # r = 1, 1, 0 — not 1.0 from dropping it
    df.loc[broken, "top1"] = 0.82  # 10 of 100 images NaN: r = (0.82 - 0.1) / 0.8 = 0.9
    assert layer_scores(df).iloc[0]["score"] == pytest.approx(((1 + 1) / 4 + (1 + 0.9) / 4 - floor) / (1 - floor))


def test_with_outcomes_every_score_has_an_interval_and_indistinguishable_models_share_a_rank():
    """Simulated studies with per-image outcomes: x and y have the same true curves, z is worse."""
    from test_bootstrap import simulate

    df, outcomes = simulate(
        np.random.default_rng(4), {"x": {"a": 0.5, "b": 0.5}, "y": {"a": 0.5, "b": 0.5}, "z": {"a": 1.2, "b": 0.9}}
    )
    text = render(df, outcomes=outcomes)
    assert "**Intervals**: 95%, by a paired percentile bootstrap" in text and "1000 replicates, seed 0" in text
    header = row_starting(text, "#")
    ranks = {r[1].split("]")[0].strip("["): r[0] for r in cells(text) if r[0] in ("1", "2", "3")}
    assert ranks == {"x": "1", "y": "1", "z": "3"}
    overall = row_starting(text, "3")[header.index("overall")]
    assert re.fullmatch(r"0\.\d\d \[0\.\d\d, 0\.\d\d\]", overall)
    # x's layers a and b have the same true score: the runner-up cannot be told apart
    assert "the runner-up" in text.split("### x")[1].split("###")[0]
    layer_row = row_starting(text.split("### z")[1], "a", "0.00")
    # true score 0.40: critical (bold) when its interval lies below 0.50, undetermined (italic) when it holds 0.50
    mark, score, low, high = re.fullmatch(r"(\*\*|_)(0\.\d\d) \[(0\.\d\d), (0\.\d\d)\]\1", layer_row[2]).groups()
    assert mark == ("**" if float(high) < 0.5 else "_") and float(low) < 0.5
    assert re.fullmatch(r"0\.\d\d \[0\.\d\d, 0\.\d\d\]", layer_row[3])  # p½ with its interval


def test_perturbations_run_on_different_level_grids_are_not_ranked():
    a = results("a", perts=("p", "q"))
    b = results("b", perts=("p", "q"))
    b.loc[(b["perturbation"] == "q") & (b["level"] == 0.5), "level"] = 0.25  # another grid for q
    text = render(pd.concat([a, b], ignore_index=True))
    header = row_starting(text, "#")
    assert "p" in header and "q" not in header
    assert "run on different level grids: q" in text
    assert row_starting(text, "q", "b") == ["q", "b", "0, 0.25, 1", "fraction p"]
    assert row_starting(text, "p", "all") == ["p", "all", "0, 0.5, 1", "fraction p"]


def test_the_label_agrees_with_the_printed_score_at_one_half():
    from lesionbench.scores import verdict

    assert verdict(0.4951) == "robust" and verdict(0.4949) == "critical"  # printed 0.50 and 0.49
    df = results(layers={"conv1": [0.9, 0.5, 0.5]})  # r = 1, 0.5, 0.5 → score 0.5 exactly (0.5 at every damaged level)
    text = render(df)
    assert "**conv1** (score 0.50, robust)" in text


def test_track_titles_name_the_data_and_a_runs_own_board_does_not_claim_another_command(tmp_path):
    src = write(results(dataset="image_folder"), tmp_path / "run" / "results.csv")
    manifest = {"study": {"dataset": {"name": "image_folder", "title": "ImageNet (sample)"}, "metric": "top1"}}
    (tmp_path / "run" / "manifest.json").write_text(__import__("json").dumps(manifest))
    text = publish([src], tmp_path / "run" / "LEADERBOARD.md", draw=False).read_text()
    assert "## Track: ImageNet \\(sample\\) (`image\\_folder`)" in text
    assert "`lesionbench leaderboard`" not in text  # a run's own board is not made by that command
    assert "## Track: Fashion-MNIST (`fashion\\_mnist`)" in render(results(dataset="fashion_mnist"))


def test_layer_tables_group_perturbations_by_the_layers_they_studied():
    """Six perturbations on all layers and one on a single layer: no table has an empty cell or more
    than three perturbations."""
    many = results("m", perts=tuple(f"p{i}" for i in range(6)))
    one = results("m", perts=("only_fc8",), layers={"fc8": [0.9, 0.9, 0.5]}).query("perturbation != 'clean'")
    one["layer_index"] = 1
    section = render(pd.concat([many, one], ignore_index=True)).split("### m")[1]
    tables = [t for t in section.split("\n\n") if t.startswith("| layer")]
    assert len(tables) == 3
    for t in tables:
        header = cells(t)[0]
        assert (len(header) - 2) // 2 <= 3 and all("–" not in row for row in cells(t))
    assert [r[0] for r in cells(tables[2])[1:]] == ["fc8"]


def test_figure_one_bands_come_from_the_bootstrap_when_there_are_outcomes(tmp_path):
    from lesionbench.leaderboard import track_bootstraps
    from lesionbench.plots import accuracy_curves, with_band
    from lesionbench.scores import curves
    from test_bootstrap import simulate

    df, outcomes = simulate(np.random.default_rng(2), {"m": {"a": 0.6}}, sigma=0.0)
    boot = track_bootstraps(df, outcomes)["sim"]
    c = curves(df)
    banded = with_band(c, boot.curves)
    moving = banded["level"] > 0
    # no draw noise: the t-interval over draws has width 0, the bootstrap over images does not
    assert (c.loc[moving, "ci_high"] - c.loc[moving, "ci_low"]).max() < 1e-12
    np.testing.assert_allclose(banded["band_high"], boot.curves["band_high"])
    assert (banded.loc[moving, "band_high"] - banded.loc[moving, "band_low"]).min() > 0.01
    plain = with_band(c, None)  # no outcomes: the t-interval, as before
    np.testing.assert_allclose(plain["band_low"], c["ci_low"])
    assert accuracy_curves(df, "m", "p", "top1", tmp_path / "f.png", boot.curves).stat().st_size > 10_000


def test_study_time_counts_each_evaluation_once_not_the_reused_clean_pass_per_layer():
    """A level that leaves the network intact is not evaluated: its row is the clean pass's. Older
    runs copied the clean pass's seconds into each such row (here 7 s, against 1 s per damaged
    cell; 6 s where the run resumed and timed its clean pass again), which made the study time one
    clean pass per layer × perturbation too long."""
    from lesionbench.leaderboard import evaluation_seconds

    df = results()
    clean = df[df["perturbation"] == "clean"].assign(seconds=7.0, loss=2.5)
    cells_ = df[df["perturbation"] != "clean"].copy()
    identity = cells_["level"] == 0.0
    cells_.loc[identity, ["loss", "top1", "top5"]] = [2.5, 0.9, 1.0]  # older runs: a copy of the clean row
    cells_.loc[identity, "seconds"] = [7.0, 6.0]
    older = cells_.copy()
    assert identity.sum() == 2 and (~identity).sum() == 8
    assert evaluation_seconds(cells_, clean) == 8.0
    cells_.loc[identity, "seconds"] = 0.0  # runs now: no time of its own
    assert evaluation_seconds(cells_, clean) == 8.0
    # a damaged cell is counted even when its numbers equal the clean pass's (a knockout of 0 units)
    cells_.loc[cells_.index[~identity][0], ["seconds", "loss", "top1", "top5"]] = [7.0, 2.5, 0.9, 1.0]
    assert evaluation_seconds(cells_, clean) == 14.0
    # and so is a level-0 row that was evaluated (a perturbation whose level 0 is damage): other numbers
    cells_.loc[cells_.index[identity][0], ["seconds", "loss"]] = [3.0, 2.0]
    assert evaluation_seconds(cells_, clean) == 17.0
    # and the leaderboard's study-time column is that sum
    old_run = pd.concat([clean, older]).sort_index()
    rows = cells(render(old_run, {"d": "top1"}))
    header = next(r for r in rows if "study time" in r)
    assert rows[rows.index(header) + 1][header.index("study time")] == "8 s"
