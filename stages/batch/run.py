"""`vd batch`: mask -> invert -> edit -> eval over the clips of a manifest, on local workers or Ray actors.

Each worker holds its models (one load per model spec, reused for all its clips and stages) and runs
whole clips, stage by stage, through the stages' own entry points (stages/batch/worker.py). A stage the
stage itself reports current (its `is_current`) is skipped, so rerunning a batch resumes it, and a changed
manifest redoes exactly the stages it affects (stages/batch/resume.py). Clips go to whichever worker is
free (stages/batch/engines.py). A failing clip never stops the others.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stages.batch.engines import ENGINES, SCHEDULE_TIMEOUT, Engine, EngineOptions, start_engine
from stages.batch.manifest import Manifest
from stages.batch.report import build_report, status_printer
from stages.batch.worker import STAGES, Job, clip_result
from stages.common.errors import Interrupted, UsageError, first_line
from stages.common.progress import Progress
from stages.io.storage import is_url

LOST_WORKER_RERUNS = 2  # a clip whose worker died is rerun this often on a healthy one, besides --retry


@dataclass
class BatchOptions:
    """Options of `vd batch` besides the manifest."""

    engine: str = "local"
    address: str | None = None
    workers: int | None = None  # None: 1 locally; Ray: one per GPU slot, else one per node (<= clips)
    gpus_per_worker: float | None = None  # None: engines.default_gpus
    threads_per_worker: int | None = None  # None: cores // workers locally, engines.DEFAULT_THREADS on Ray
    out: str = "runs"
    only: list[str] = field(default_factory=lambda: list(STAGES))
    retry: int = 0
    scratch: str | None = None
    schedule_timeout: float = SCHEDULE_TIMEOUT
    verbose: bool = False


def check_options(opts: BatchOptions) -> None:
    """Refuse bad options before anything runs."""
    if opts.engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {opts.engine!r}")
    if opts.workers is not None and not 1 <= opts.workers <= 4096:
        raise UsageError(f"--workers must be in 1..4096, got {opts.workers}")
    if opts.threads_per_worker is not None and opts.threads_per_worker < 1:
        raise UsageError(f"--threads-per-worker must be >= 1, got {opts.threads_per_worker}")
    if opts.gpus_per_worker is not None and opts.gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker must be >= 0, got {opts.gpus_per_worker}")
    if opts.retry < 0:
        raise UsageError(f"--retry must be >= 0, got {opts.retry}")
    if not 0 < opts.schedule_timeout <= 86400:
        raise UsageError(f"--schedule-timeout must be in (0, 86400] seconds, got {opts.schedule_timeout:g}")
    bad = [s for s in opts.only if s not in STAGES]
    if bad or not opts.only:
        raise UsageError(f"--only takes stages from {','.join(STAGES)}, got {','.join(opts.only) or 'nothing'}")
    if opts.engine == "local" and opts.address:
        raise UsageError("--address applies to --engine ray")
    if opts.engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--engine ray needs Ray: pip install 'vd[batch]' (or ray>=2.40)") from None
    if is_url(opts.out):
        try:
            from fsspec.core import url_to_fs

            url_to_fs(opts.out)
        except (ImportError, ValueError) as exc:
            raise UsageError(f"--out {opts.out}: {first_line(exc)}") from None


def run_batch(manifest: Manifest, opts: BatchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run every clip of `manifest`; returns the batch report (failed clips are listed, not raised)."""
    progress = progress or Progress(quiet=True)
    check_options(opts)
    out = opts.out if is_url(opts.out) else str(Path(opts.out).resolve())
    from stages.io.storage import workspace_target

    jobs = [Job(p, workspace_target(out, p.name), list(opts.only), opts.scratch) for p in manifest.clips]
    started = time.perf_counter()
    show = status_printer(progress)
    # Ray prints its notices (a lost actor, a retried task) on stdout, which --json keeps for the report
    with contextlib.redirect_stdout(sys.stderr) if opts.engine == "ray" else contextlib.nullcontext():
        engine = start_engine(EngineOptions(opts.engine, opts.workers, opts.address, opts.gpus_per_worker,
                                            opts.threads_per_worker, opts.schedule_timeout, opts.retry,
                                            opts.verbose),
                              len(jobs), [p.invert.device for p in manifest.clips], show)
        progress.log(f"batch: {len(jobs)} clip(s), engine {opts.engine}, {engine.size} worker(s), out {out}")
        results: dict[int, dict[str, Any]] = {}
        try:
            _drive(engine, jobs, opts.retry, progress, show, results)
        except KeyboardInterrupt:
            engine.interrupt()
            raise Interrupted("batch interrupted; finished stages are kept in the workspaces, rerun the same "
                              "command to resume") from None
        finally:
            try:
                stats = engine.stats()
            finally:
                engine.close()
    return build_report(manifest, opts.engine, opts.only, out, [results[k] for k in sorted(results)], stats,
                        engine.size, time.perf_counter() - started)


def _drive(engine: Engine, jobs: list[Job], retry: int, progress: Progress, show: Callable[[dict[str, Any]], None],
           results: dict[int, dict[str, Any]]) -> None:
    """Hand the clips to the engine's free workers until every clip has its result (in `results`)."""
    with progress.task("batch", total=len(jobs)) as advance:
        pending, running = deque(jobs), {}

        def finish(job: Job, res: dict[str, Any]) -> None:
            results[job.plan.index] = res
            failed = sum(r["status"] == "failed" for r in results.values())
            advance(1, done=len(results) - failed, failed=failed)

        while pending or running:
            while pending and len(running) < engine.capacity():
                job = pending.popleft()
                running[engine.submit(job)] = job
            for handle, res in engine.wait(list(running), 0.5):
                job = running.pop(handle)
                if res["status"] == "failed" and res.get("worker_lost") and job.lost < LOST_WORKER_RERUNS:
                    job.lost += 1  # the clip did nothing wrong: rerun it on a healthy worker, whatever --retry
                    progress.log(f"{job.plan.name}: {res['error']}; rerun on a healthy worker")
                    pending.append(job)
                    continue
                if res["status"] == "failed" and res.get("transient") and job.attempt < retry:
                    job.attempt += 1
                    progress.log(f"{job.plan.name}: {res['error']}; retry {job.attempt}/{retry}")
                    pending.append(job)
                    continue
                finish(job, res)
            for event in engine.events():
                show(event)
            gone = engine.gone() if pending and not running else None
            while gone and pending:  # every worker is lost: the clips left fail with the reason
                job = pending.popleft()
                finish(job, clip_result(job, None, status="failed", error=gone, seconds=None))
