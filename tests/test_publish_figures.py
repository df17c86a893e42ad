"""Publishing without figures (``lesionbench leaderboard --no-plots``, ``run --no-plots``) imports no
matplotlib, yet links the very figures a publish with figures draws."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

import lesionbench.plots as plots
import lesionbench.publish as publishing
from lesionbench.publish import publish
from test_class_damage import _one_weak_unit
from test_leaderboard import results, write

LINK = re.compile(r"\]\(([^)\s]+\.png)\)")


def _figure_links(out_dir: Path) -> dict[str, list[str]]:
    """Each Markdown document under ``out_dir`` → the figure links it holds, as written."""
    return {str(p.relative_to(out_dir)): LINK.findall(p.read_text()) for p in sorted(out_dir.rglob("*.md"))}


def _linked_files(out_dir: Path, links: dict[str, list[str]]) -> set[Path]:
    return {(out_dir / doc).parent.joinpath(link).resolve() for doc, found in links.items() for link in found}


def test_a_leaderboard_without_figures_imports_no_matplotlib_and_links_the_figures_a_drawn_one_writes(tmp_path):
    """A run with per-image outcomes (every kind of figure: curves, layer and per-class heatmaps,
    score vs depth, the headline) beside a hand-made table of another dataset with an awkward model
    name: published with --no-plots in a fresh interpreter, matplotlib stays unloaded and nothing is
    drawn; its links are those of a publish that draws, and those name exactly the files it wrote."""
    import lesionbench

    net, x, y = _one_weak_unit(per_class=10)
    lesionbench.run(
        model=net,
        data=(x, y),
        out=tmp_path / "runs" / "a",
        perturbations=["filter_prune", "weight_noise"],
        levels=[0.0, 1 / 3],
        layers=["1"],
        seed=0,
        device="cpu",
        progress=False,
    )
    other = write(results("timm:x/../y", dataset="other set"), tmp_path / "runs" / "b" / "results.csv")
    sources = [str(tmp_path / "runs" / "a"), str(other)]

    bare = tmp_path / "bare"
    code = (
        "import sys, contextlib, io\nfrom lesionbench.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    code = main(sys.argv[1:])\n"
        "print(code, 'matplotlib' in sys.modules)"
    )
    argv = ["leaderboard", *sources, "--no-plots", "--out", str(bare / "LEADERBOARD.md")]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["0", "False"]  # exit 0, matplotlib never imported
    assert not list(bare.rglob("*.png"))

    drawn = tmp_path / "drawn"
    publish(sources, drawn / "LEADERBOARD.md")
    written = {p.resolve() for p in (drawn / "plots").rglob("*.png")}
    links = _figure_links(drawn)
    assert _linked_files(drawn, links) == written
    kinds = {re.sub(r".*__", "", p.stem) for p in written}  # the last part of each name: what it shows
    assert {"filter_prune", "weight_noise", "heatmap", "classes", "headline", "p", "score_vs_depth"} <= kinds
    assert _figure_links(bare) == links


def _count_depth_figures(monkeypatch) -> list:
    drawn = []
    real = plots.score_vs_depth_figure

    def counted(df, metrics, perts=None, score="area"):
        drawn.append((sorted(df["dataset"].unique()), list(perts)))
        return real(df, metrics, perts, score)

    monkeypatch.setattr(plots, "score_vs_depth_figure", counted)
    return drawn


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_a_single_tracks_headline_is_its_score_vs_depth_page_drawn_once(tmp_path, monkeypatch):
    """One track, every perturbation ranked: the headline shows what the page of every model shows, and
    is not drawn a second time; where the ranked perturbations differ (q run on one model only) or a
    second track shares the page, each headline is drawn from its own rows and perturbations."""
    two = results("m", perts=("p", "q")), results("n", layers={"conv1": [0.9, 0.5, 0.1], "fc8": [0.9, 0.2, 0.1]})
    cases = {
        "same": ([two[0], results("n", perts=("p", "q"))], [(["d"], ["p", "q"])]),
        "fewer ranked": ([two[0], two[1]], [(["d"], ["p", "q"]), (["d"], ["p"])]),
        "two tracks": (
            [two[0], results("o", dataset="e")],
            [(["d", "e"], ["p", "q"]), (["d"], ["p", "q"]), (["e"], ["p"])],
        ),
    }
    for name, (tables, expected) in cases.items():
        drawn = _count_depth_figures(monkeypatch)
        src = write(pd.concat(tables, ignore_index=True), tmp_path / name / "results.csv")
        publish([src], tmp_path / name / "board" / "LEADERBOARD.md")
        assert drawn == expected, name
        out = tmp_path / name / "board" / "plots"
        page, headline = _pixels(out / "score_vs_depth.png"), _pixels(out / "d__headline.png")
        same = page.shape == headline.shape and (page == headline).all()
        assert same == (name == "same"), name
        monkeypatch.undo()


def test_publishing_leaves_the_collectors_freeze_as_it_found_it(tmp_path, monkeypatch):
    """While the figures are drawn the objects alive before are frozen out of full collections
    (gc.freeze); afterwards nothing is frozen, and a program's own freeze is left alone."""
    src = write(results("m"), tmp_path / "run" / "results.csv")
    seen = []
    real = publishing.collect
    monkeypatch.setattr(publishing, "collect", lambda *a, **k: seen.append(gc.get_freeze_count()) or real(*a, **k))
    assert gc.get_freeze_count() == 0
    publish([src], tmp_path / "a" / "LEADERBOARD.md", draw=False)
    assert seen[-1] > 1000 and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        publish([src], tmp_path / "b" / "LEADERBOARD.md", draw=False)
        # not frozen again (no more objects) and not unfrozen (a few frozen objects may have been freed)
        assert mine // 2 < seen[-1] <= mine and mine // 2 < gc.get_freeze_count() <= mine
    finally:
        gc.unfreeze()
