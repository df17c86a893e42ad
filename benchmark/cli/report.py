"""The end-of-run summary printed to the terminal: layer scores and the most fragile layer."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.table import Table

from lesionbench.cli.tables import print_table
from lesionbench.layer_score import DEFAULT_SCORE
from lesionbench.leaderboard import format_critical, with_interval
from lesionbench.scores import NOT_SCORED, at_chance, layer_scores
from lesionbench.study import Study

STYLES = {"critical": "red", "robust": "green", "undetermined": "yellow"}


def print_summary(
    df: pd.DataFrame, study: Study, console: Console, scores: pd.DataFrame | None = None, score=DEFAULT_SCORE
) -> bool:
    """Print each model's layer scores and most fragile layer; returns True when a model was not
    scored (clean accuracy at chance). ``scores``: :func:`lesionbench.bootstrapping`'s ``layers`` (with
    intervals and interval verdicts), else :func:`layer_scores` (verdicts from the score alone) of
    ``score`` (a registered score's name or the score)."""
    scores = layer_scores(df, study.metric, score) if scores is None else scores
    for model, g in scores.groupby("model", sort=False):
        table = Table(title=f"{model}: layer-robustness score ({study.metric}; 1 = untouched, 0 = chance)")
        table.add_column("layer")
        perts = list(dict.fromkeys(g["perturbation"]))
        for p in perts:
            table.add_column(f"{p}\nscore / p½", justify="right")
        for layer, lg in g.groupby(["layer_index", "layer"], sort=True):
            cells = []
            for p in perts:
                r = lg[lg["perturbation"] == p]
                if r.empty:
                    cells.append("-")
                    continue
                r = r.iloc[0]
                style = STYLES.get(r.verdict, "green")
                cells.append(
                    f"[{style}]{r.score:.2f}[/{style}] / {format_critical(r.critical_level, r.max_level, r.level_axis)}"
                )
            table.add_row(layer[1], *cells)
        print_table(console, table)
        for p in perts:
            pg = g[g["perturbation"] == p]
            w = pg.loc[pg["score"].idxmin()]
            score = with_interval(
                w.score, getattr(w, "score_low", float("nan")), getattr(w, "score_high", float("nan"))
            )
            console.print(f"most fragile layer under {p}: [bold]{w.layer}[/bold] (score {score}, {w.verdict})")
    unscored = at_chance(df, study.metric)
    for r in unscored.itertuples():
        console.print(
            f"{r.model}: [bold]{NOT_SCORED}[/bold] ({study.metric} {r.clean:.3f} on {r.n_images:g} images, "
            f"chance {r.chance:g})"
        )
    return not unscored.empty
