"""Rich tables as the command line prints them, on a terminal and off it."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_table(console: Console, table: Table) -> None:
    """Print ``table``; off a terminal (CI logs, ``> file``) its title goes on a line of its own above it,
    since rich wraps a title to the table's width (a long title became four centred lines)."""
    if table.title and not console.is_terminal:
        title, table.title = table.title, None
        console.print(str(title), markup=False, highlight=False, soft_wrap=True)
    console.print(table)
