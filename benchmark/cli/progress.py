"""Progress of a run: a live bar on a terminal, plain lines everywhere else (CI logs, ``> log``).

Both count cells (done / total) and estimate the time left from the recent rate (rich's own
estimate over its speed window, so cells a resumed run skips do not make it optimistic for long).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_INTERVAL_S = 30.0  # one plain line at most this often (and on the first and the last cell)


@contextmanager
def rich_progress(console: Console, total: int) -> Iterator[Callable[[str], None]]:
    """Yield a ``tick(description)`` that advances one cell: a live bar on a terminal or in a
    notebook, else :func:`plain_progress` lines on the same console."""
    if not (console.is_terminal or console.is_jupyter):
        with plain_progress(console, total) as tick:
            yield tick
        return
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


@contextmanager
def plain_progress(
    console: Console, total: int, interval: float = PLAIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic
) -> Iterator[Callable[[str], None]]:
    """Yield a ``tick(description)`` that prints ``progress: 120/1225 cells (9.8%), 0:01:10
    elapsed, ETA 0:10:45 · <cell>`` on the first cell, then at most every ``interval`` seconds,
    and on the last cell; each line is flushed at once."""
    tracker = Progress(disable=True, get_time=clock)  # rich's rate estimate, no display
    task = tracker.add_task("", total=total)
    start = clock()
    state = {"done": 0, "last": None}

    def tick(description: str) -> None:
        tracker.update(task, advance=1)
        state["done"] += 1
        now, done = clock(), state["done"]
        if state["last"] is not None and now - state["last"] < interval and done < total:
            return
        state["last"] = now
        remaining = tracker.tasks[0].time_remaining
        eta = (
            _clock_text(remaining) if remaining is not None and done < total else ("0:00:00" if done >= total else "?")
        )
        percent = 100.0 * done / total if total else 100.0
        console.out(
            f"progress: {done}/{total} cells ({percent:.1f}%), {_clock_text(now - start)} elapsed, "
            f"ETA {eta} · {description}",
            highlight=False,
        )
        console.file.flush()

    yield tick


def _clock_text(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


@contextmanager
def stderr_progress(total: int) -> Iterator[Callable[[str], None]]:
    """:func:`rich_progress` on standard error: ``lesionbench.run``'s default progress."""
    with rich_progress(Console(stderr=True), total) as tick:
        yield tick


@contextmanager
def callback_progress(callback: Callable[[int, int, str], object], total: int) -> Iterator[Callable[[str], None]]:
    """Yield a ``tick(description)`` that calls ``callback(done, total, description)`` after each cell."""
    done = 0

    def tick(description: str) -> None:
        nonlocal done
        done += 1
        callback(done, total, description)

    yield tick
