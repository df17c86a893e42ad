"""From result files to the published artefacts: plots next to the results and the leaderboard.

This is the only place that writes the leaderboard; ``lesionbench leaderboard`` and the end of
``lesionbench run`` both come through here, so the two cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lesionbench.errors import LesionbenchError
from lesionbench.leaderboard import metric_of, relative_link, render
from lesionbench.store import CLEAN, RESULTS, read_results


def resolve_results(paths: Sequence[Path | str]) -> list[Path]:
    """Result files from files or run directories (searched recursively for results.csv)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob(RESULTS))
            if not found:
                raise LesionbenchError(f"no {RESULTS} under {str(p)!r}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise LesionbenchError(f"results path {str(p)!r} does not exist")
    return out


def declared_units(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of result files written before ``level_unit`` was recorded get the unit their
    perturbation declares now (its ``LevelAxis.label``), so plot axes name it; unknown ones keep ""."""
    from lesionbench.plan import BN_SUFFIX
    from lesionbench.registry import get_registry

    missing = (df["level_unit"].fillna("") == "") & (df["perturbation"] != CLEAN)
    if not missing.any():
        return df
    declared = {name: c.obj.axis.label for name, c in get_registry().contributions("perturbations").items()}
    df = df.copy()
    df.loc[missing, "level_unit"] = [declared.get(p.removesuffix(BN_SUFFIX), "") for p in df.loc[missing, "perturbation"]]
    return df


def publish(
    results: Sequence[Path | str],
    out_md: Path,
    plots_dir: Path | None = None,
    draw: bool = True,
    title: str = "lesionbench leaderboard",
    metric: str | None = None,
) -> Path:
    """Write plots (into ``plots_dir``, default beside ``out_md``) and the Markdown leaderboard."""
    files = resolve_results(results)
    tables = [read_results(f) for f in files]  # each file read once
    df = declared_units(pd.concat(tables, ignore_index=True))
    metrics = {dataset: metric or metric_of(f) for f, t in zip(files, tables) for dataset in t["dataset"].unique()}
    out_md = Path(out_md)
    plots_dir = Path(plots_dir) if plots_dir is not None else out_md.parent / "plots"
    links = {}
    if draw:
        from lesionbench.plots import write_all

        drawn = write_all(df, metrics, plots_dir)
    else:
        from lesionbench.plots import planned_paths

        drawn = planned_paths(df, plots_dir)
    for model, items in drawn.items():
        links[model] = [(label, relative_link(path, out_md.parent)) for label, path in items]
    sources = [relative_link(f, out_md.parent) for f in files]
    text = render(df, metrics, links, title=title, sources=sources)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_md.with_name(out_md.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out_md)
    return out_md
