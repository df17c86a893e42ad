"""Publishing without figures (``lesionbench leaderboard --no-plots``, ``run --no-plots``) imports no
matplotlib, yet links the very figures a publish with figures draws."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
