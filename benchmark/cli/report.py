"""The end-of-run summary printed to the terminal: layer scores and the most fragile layer."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.table import Table

from lesionbench.cli.tables import print_table
from lesionbench.leaderboard import format_critical
from lesionbench.scores import layer_scores
from lesionbench.study import Study


def print_summary(df: pd.DataFrame, study: Study, console: Console) -> None:
    scores = layer_scores(df, study.metric)
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
                style = "red" if r.verdict == "critical" else "green"
                cells.append(f"[{style}]{r.score:.2f}[/{style}] / {format_critical(r.critical_level, r.max_level, r.level_axis)}")
            table.add_row(layer[1], *cells)
        print_table(console, table)
        for p in perts:
            pg = g[g["perturbation"] == p]
            w = pg.loc[pg["score"].idxmin()]
            console.print(f"most fragile layer under {p}: [bold]{w.layer}[/bold] (score {w.score:.2f})")
