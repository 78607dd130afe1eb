"""Progress reporting on stderr: a Rich bar with ETA on a terminal, plain lines otherwise, or nothing."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, TextIO

Advance = Callable[..., None]


class Progress:
    """Reports long work. `task()` yields `advance(n=1, **fields)`; `log()` prints one line."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, plain: bool | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.plain = (not self.stream.isatty()) if plain is None else plain
        self._console = None  # the live Rich console while a bar is shown: log lines go above the bar

    def log(self, message: str) -> None:
        """Print a status line (suppressed by --quiet)."""
        if self.quiet:
            return
        if self._console is not None:
            self._console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int, completed: int = 0) -> Iterator[Advance]:
        """Track `total` units of work, `completed` of them already done (resume)."""
        if self.quiet:
            yield lambda n=1, **fields: None
        elif self.plain:
            yield from self._plain(description, total, completed)
        else:
            yield from self._rich(description, total, completed)

    def _plain(self, description: str, total: int, completed: int) -> Iterator[Advance]:
        state = {"done": completed, "last": 0.0}
        start = time.monotonic()

        def advance(n: int = 1, **fields: object) -> None:
            state["done"] += n
            now = time.monotonic()
            done = state["done"]
            if done >= total or now - state["last"] >= 5.0:
                state["last"] = now
                rate = (done - completed) / max(now - start, 1e-9)
                eta = (total - done) / rate if rate > 0 else float("inf")
                extra = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
                self.log(f"{description}: {done}/{total} eta {_fmt_eta(eta)} {extra}".rstrip())

        yield advance

    def _rich(self, description: str, total: int, completed: int) -> Iterator[Advance]:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with RichProgress(*columns, console=Console(file=self.stream), transient=False) as bar:
            task_id = bar.add_task(description, total=total, completed=completed, info="")

            def advance(n: int = 1, **fields: object) -> None:
                info = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
                bar.update(task_id, advance=n, info=info)

            outer, self._console = self._console, bar.console
            try:
                yield advance
            finally:
                self._console = outer


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt_eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes}:{sec:02d}"
