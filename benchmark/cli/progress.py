"""The rich progress bar: overall bar with ETA and the cell being evaluated."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def rich_progress(console: Console, total: int) -> Iterator[Callable[[str], None]]:
    """Yield a ``tick(description)`` that advances one cell."""
    columns = (
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=total)

        def tick(description: str) -> None:
            progress.update(task, advance=1, description=description)

        yield tick
