"""The one progress bar of long work (crawl, build, train, tag, embed): on stderr, rich's columns."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(
    console: Console,
    label: str = "{task.description}",
    info: str = "{task.fields[info]}",
    *,
    eta: bool = False,
    disable: bool = False,
) -> Progress:
    """A bar with the label, the count done of the total, a line of facts (`info`, a field each task sets) and the
    time elapsed (and left, with `eta`)."""
    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(info), TimeElapsedColumn()]
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=False, disable=disable)
