"""Long work on the page: one job at a time (the loaded models are shared), its progress, and Stop.

Stop works through the stages' own interruption: the next unit of progress raises KeyboardInterrupt inside
the stage, which keeps every finished step (vd invert resumes from them) exactly as Ctrl-C does in the CLI.
A second browser tab sees the running job on the status line and is refused a second one; the stage
locks keep the CLI and the page from writing one workspace at once.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from stages.common.errors import InputError
from stages.common.progress import Advance, Progress

# (done, total or None, description) -> None; the page passes Gradio's progress bar
Report = Callable[[float, "float | None", str], None]


@dataclass
class Job:
    """The running job: what, where, how far."""

    kind: str
    workspace: str
    started: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    description: str = "starting"
    done: float = 0
    total: float = 0
    lines: list[str] = field(default_factory=list)

    def state(self) -> str:
        """One line: the job, its task and count, its age."""
        count = f" {int(self.done)}/{int(self.total)}" if self.total else ""
        stopping = ", stopping" if self.stop.is_set() else ""
        return (f"{self.kind} on {self.workspace}: {self.description}{count} "
                f"({time.monotonic() - self.started:.0f} s{stopping})")


class JobBoard:
    """The one running job of this server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.job: Job | None = None
        self.last = "no job has run yet"

    @contextlib.contextmanager
    def run(self, kind: str, workspace: str) -> Iterator[Job]:
        """Hold the board for a job; InputError at once (no waiting) while another job runs."""
        with self._lock:
            if self.job is not None:
                raise InputError(f"busy: {self.job.state()}; wait for it or press Stop")
            job = self.job = Job(kind, str(workspace))
        outcome = "failed"
        try:
            yield job
            outcome = "done"
        finally:
            if job.stop.is_set() and outcome != "done":
                outcome = "stopped"
            with self._lock:
                self.job = None
                self.last = f"last job: {kind} on {workspace} {outcome} after {time.monotonic() - job.started:.0f} s"

    def stop(self) -> str:
        """Ask the running job to stop at its next unit of work."""
        with self._lock:
            job = self.job
        if job is None:
            return "no job is running"
        job.stop.set()
        return f"stopping {job.kind} on {job.workspace} (finished steps are kept; run it again to resume)"

    def status(self) -> str:
        """The running job's state, or how the last one ended."""
        with self._lock:
            job = self.job
        return f"running: {job.state()}" if job is not None else self.last


class PageProgress(Progress):
    """stages.common.progress.Progress for the page: counts and log lines go to the job and to `report`."""

    def __init__(self, job: Job, report: Report | None = None):
        super().__init__(quiet=False, stream=io.StringIO(), plain=True)
        self.job = job
        self.report = report

    def log(self, message: str) -> None:
        self.job.lines.append(message)
        if self.report is not None:
            self.report(0, None, message)

    @contextlib.contextmanager
    def task(self, description: str, total: int, completed: int = 0) -> Iterator[Advance]:
        job = self.job
        job.description, job.total, job.done = description, total, completed
        self._check()

        def advance(n: int = 1, **fields: object) -> None:
            job.done += n
            if self.report is not None:
                self.report(job.done, job.total, description)
            self._check()

        yield advance

    def _check(self) -> None:
        if self.job.stop.is_set():
            raise KeyboardInterrupt  # the stages' own interruption: finished work kept, resumable
