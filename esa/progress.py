"""Progress bars for long loops (rich, on stderr, only when it is a terminal); ``ESA_PROGRESS=0`` or ``quiet()``
silences them."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_state = {"enabled": os.environ.get("ESA_PROGRESS", "1") != "0"}
console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[_Bar]:
    """A rich progress bar on stderr while the block runs; a no-op when progress is disabled."""
    if not _state["enabled"] or not console.is_terminal:
        yield _Bar(None, None)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield _Bar(progress, task)


@contextmanager
def quiet() -> Iterator[None]:
    previous = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = previous
