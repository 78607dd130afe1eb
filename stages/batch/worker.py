"""What one batch worker does: hold its models (one load per model spec) and run whole clips, stage by
stage, through the stages' own entry points. Whether a stage is already current is the stage's own rule
(stages.mask/invert/edit/export/evaluate `is_current`, see stages/batch/resume.py); a stage that runs says why.
The export runs after the edits and before eval (whose seam metric reads the exports).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.batch.manifest import ClipPlan
from stages.batch.resume import export_plan, invert_action
from stages.common.errors import InputError, Interrupted, Transient, VdError, first_line
from stages.common.progress import Progress

STAGES = ("mask", "invert", "edit", "export", "eval")  # export only for clips with an `export:` key
LOG_LINES = 40  # lines of a clip's log kept for the report of a failed clip
_LOAD_LOCK = threading.Lock()  # model builders seed torch's global RNG: one load at a time per process


@dataclass
class Job:
    """One clip to run (sent to a worker)."""

    plan: ClipPlan
    target: str
    only: list[str]
    scratch: str | None
    attempt: int = 0  # retries after a transient failure (--retry)
    lost: int = 0  # reruns after its worker was lost (automatic, not counted against --retry)


def clip_result(job: Job, worker: int | None, **fields: Any) -> dict[str, Any]:
    """A clip's row of the batch report, `fields` overriding the defaults (a clip just started)."""
    plan = job.plan
    result: dict[str, Any] = {
        "index": plan.index, "name": plan.name, "clip": plan.clip, "workspace": job.target,
        "worker": worker, "attempt": job.attempt, "lost_workers": job.lost, "status": "running", "error": None, "stage": None,
        "transient": False, "stages": {}, "run": [], "skipped": [], "metrics": None, "exports": None,
        "model_loads": 0, "pid": None, "seconds": None, "log": None, "worker_lost": False}
    result.update(fields)
    return result


def set_threads(threads: int) -> None:
    """Torch/OpenMP threads for this worker (workers share the cores instead of oversubscribing them)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(max(1, int(threads)))


class ClipLog(Progress):
    """A clip's log: the stages' status lines and this thread's log records, the last LOG_LINES kept for
    the report; with `echo` also printed on stderr (an actor's stderr reaches the driver with -v)."""

    def __init__(self, prefix: str, echo: bool = False):
        super().__init__(quiet=True)
        self.prefix = prefix
        self.echo = echo
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.handler = _ThreadHandler(self, threading.get_ident())

    def log(self, message: str) -> None:
        self.lines.append(message)
        if self.echo:
            print(f"{self.prefix}: {message}", file=sys.stderr, flush=True)

    def __enter__(self) -> "ClipLog":
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self.handler)


class _ThreadHandler(logging.Handler):
    """Log records of one thread (a worker's clip) into its ClipLog."""

    def __init__(self, sink: ClipLog, thread: int):
        super().__init__(logging.INFO)
        self.sink, self.thread = sink, thread

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            try:
                self.sink.log(f"{record.name}: {record.getMessage()}")
            except Exception:  # a log line must never fail a clip
                pass


def _unexpected(exc: BaseException, stage: str | None) -> tuple[str, bool]:
    """(one-line error, transient) of an exception the stages did not turn into a VdError. An out-of-memory
    is permanent (the same settings fail the same way) and gets the memory hint; others may be transient."""
    from stages.models.oom import is_oom, out_of_memory

    if is_oom(exc):
        return first_line(out_of_memory(exc, stage=stage)), False
    return f"{type(exc).__name__}: {first_line(exc)}", True


class Worker:
    """A batch worker: loads each model once and runs whole clips. `events` receives status dicts (a
    callable, or a Ray queue with put_nowait); `stop` (local threads) ends a run between stages;
    `verbose` prints the stages' lines on stderr."""

    def __init__(self, index: int, threads: int, device: str | None = None, events: Any = None,
                 stop: threading.Event | None = None, verbose: bool = False):
        self.index = index
        self.threads = threads
        self.device = device
        self.events = events
        self.stop = stop
        self.verbose = verbose
        self.loads = 0
        self._models: dict[tuple[Any, ...], Any] = {}
        self._identities: dict[str, str] = {}
        self._scorers: dict[str, Any] = {}
        set_threads(threads)

    def stats(self) -> dict[str, Any]:
        """This worker's counters (and, in a Ray actor, the resources Ray gave it)."""
        import socket

        out = {"worker": self.index, "model_loads": self.loads, "threads": self.threads, "pid": os.getpid(),
               "host": socket.gethostname(), "device": self.device}
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id():
            out["resources"] = ray.get_runtime_context().get_assigned_resources()
        return out

    def emit(self, **event: Any) -> None:
        """Send a status event (best effort)."""
        event.update(worker=self.index, pid=os.getpid())
        put = getattr(self.events, "put_nowait", None) or self.events
        if put is not None:
            try:
                put(event)
            except Exception:  # status lines are best effort; never fail a clip over them
                pass

    # ------------------------------------------------------------------ models
    def models_for(self, spec: str, dtype: str = "auto", per_frame_groupnorm: bool = True) -> Any:
        """The worker's loaded model for `spec` (loaded on first use, then reused)."""
        from stages.models import load as M

        key = (spec, self.device or "auto", dtype, bool(per_frame_groupnorm))
        if key not in self._models:
            with _LOAD_LOCK:
                self._models[key] = M.load_models(spec, device=self.device or "auto", dtype=dtype,
                                                  per_frame_groupnorm=per_frame_groupnorm)
            self.loads += 1
        return self._models[key]

    def identity(self, spec: str) -> str:
        """The model identity of `spec` on this node, without loading it (once per worker)."""
        from stages.models.resolve import model_identity

        if spec not in self._identities:
            self._identities[spec] = model_identity(spec)
        return self._identities[spec]

    def _scorers_for(self, cfg: Any) -> Any:
        import json

        from stages.evaluate import Scorers

        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
        if key not in self._scorers:
            self._scorers[key] = Scorers(cfg)
        return self._scorers[key]

    def _device(self, cfg: Any) -> Any:
        if self.device and getattr(cfg, "device", "auto") == "auto":
            return dataclasses.replace(cfg, device=self.device)
        return cfg

    # ------------------------------------------------------------------ one clip
    def run_clip(self, job: Job) -> dict[str, Any]:
        """Run the clip's stages; a failure is reported in the result (one line, and the clip's last log
        lines), never raised."""
        from stages.io.storage import Storage

        plan = job.plan
        result = clip_result(job, self.index, pid=os.getpid())
        loads, start = self.loads, time.perf_counter()
        stage: str | None = "sync"
        with ClipLog(f"[worker {self.index}] {plan.name}", self.verbose) as log:
            try:
                # a lease left by a dead node (no heartbeat for its TTL) is waited out, then taken over
                with Storage(job.target, job.scratch, wait_dead=True) as storage:
                    storage.pull()
                    for stage in STAGES:
                        if stage not in job.only or (stage == "export" and plan.export is None):
                            continue
                        if self.stop is not None and self.stop.is_set():
                            raise Interrupted("batch interrupted")
                        self.emit(kind="start", clip=plan.name, stage=stage)
                        t0 = time.perf_counter()
                        status, info = getattr(self, f"_{stage}")(plan, storage.local, job, log)
                        seconds = round(time.perf_counter() - t0, 3)
                        storage.push(stage, ran=status == "run")
                        if stage == "eval":
                            result["metrics"] = info.pop("metrics", None)
                        if stage == "export":
                            result["exports"] = {n: _remote(Path(p), storage.local, job.target)
                                                 for n, p in info.pop("outputs").items()}
                        result["stages"][stage] = {"status": status, "seconds": seconds, **info}
                        result["run" if status == "run" else "skipped"].append(stage)
                        if status == "run":
                            log.log(f"{stage}: ran ({info.get('why')})")
                        self.emit(kind="end", clip=plan.name, stage=stage, status=status, seconds=seconds,
                                  why=info.get("why"))
                    stage = None
                    result["status"] = "done"
                    storage.cleanup()
            except (Interrupted, KeyboardInterrupt):
                raise
            except VdError as exc:  # incl. OutOfMemory (exit 5): permanent, its line carries the hint
                # Transient (a lease held by a live writer, a damaged scratch copy): --retry retries it
                result.update(status="failed", error=first_line(exc), stage=stage,
                              transient=isinstance(exc, Transient))
            except Exception as exc:  # unexpected: may be transient (I/O, a lost node): --retry
                error, transient = _unexpected(exc, stage)
                log.lines.extend(traceback.format_exc().rstrip().splitlines()[-12:])
                result.update(status="failed", error=error, stage=stage, transient=transient)
            if result["status"] == "failed":
                result["log"] = list(log.lines)
                self.emit(kind="failed", clip=plan.name, stage=stage, error=result["error"])
        result["model_loads"] = self.loads - loads
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result

    # ------------------------------------------------------------------ stages
    def _mask(self, plan: ClipPlan, ws_path: Path, job: Job, log: ClipLog) -> tuple[str, dict[str, Any]]:
        from stages.io import video as vid
        from stages.io.storage import fetch_clip
        from stages.mask import is_current
        from stages.mask.run import run_mask

        clip = fetch_clip(plan.clip, job.scratch)
        if not Path(clip).exists():
            raise InputError(f"clip {plan.clip} not found")
        sha = vid.source_sha256(clip)
        fresh, why = is_current(ws_path, clip, plan.mask, sha)
        if fresh:
            return "skipped", {}
        # the batch decides what to redo: a clip, selection or frames that changed replace the old ones
        cfg = dataclasses.replace(self._device(plan.mask), force=True)
        result = run_mask(clip, ws_path, cfg, log)
        return "run", {"why": why,
                       "coverage": round(sum(result["mask"]["coverage_edit"]) / max(result["frames"], 1), 4),
                       **({"relabelled": result["relabelled"]} if result.get("relabelled") else {})}

    def _invert(self, plan: ClipPlan, ws_path: Path, job: Job, log: ClipLog) -> tuple[str, dict[str, Any]]:
        from stages.invert import run_invert
        from stages.io.workspace import Workspace

        ws = Workspace.open(ws_path)
        cfg = self._device(dataclasses.replace(plan.invert, restart=False))
        action, why = invert_action(ws, cfg, self.identity(cfg.model))
        if action == "skip":
            return "skipped", {"recon_psnr": (ws.group_attrs("inversion").get("recon") or {}).get("psnr")}
        cfg.restart = action == "restart"
        if action == "update":  # labels only (the subject): no model needed
            result = run_invert(ws, cfg, log)
            return "run", {"why": why, "recon_psnr": (result.get("recon") or {}).get("psnr")}
        models = self.models_for(cfg.model, cfg.dtype, cfg.per_frame_groupnorm)
        try:
            result = run_invert(ws, cfg, log, models=models)
        except InputError as exc:  # the stage refused to resume (e.g. another dtype on this node): restart
            if action != "resume":
                raise
            action, why = "restart", f"{why}; cannot resume: {first_line(exc)}"
            cfg.restart = True
            result = run_invert(ws, cfg, log, models=models)
        return "run", {"why": why, "resumed": action == "resume", "restarted": action == "restart",
                       "recon_psnr": (result.get("recon") or {}).get("psnr")}

    def _edit(self, plan: ClipPlan, ws_path: Path, job: Job, log: ClipLog) -> tuple[str, dict[str, Any]]:
        from stages.edit import is_current
        from stages.edit.run import load_inversion_for_edit, run_edits
        from stages.io.workspace import Workspace

        if not plan.edits:
            return "skipped", {"edits_run": [], "edits_skipped": []}
        ws = Workspace.open(ws_path)
        inv = load_inversion_for_edit(ws)
        todo, done, names, reasons = [], [], [], {}
        for cfg, name in zip(plan.edits, plan.edit_names):
            cfg = self._device(dataclasses.replace(cfg, force=True))
            fresh, why = is_current(ws, cfg, inv)
            if fresh:
                done.append(name)
            else:
                todo.append(cfg)
                names.append(name)
                reasons[name] = why
        if todo:
            pfg = (inv.attrs.get("config") or {}).get("per_frame_groupnorm", True)
            models = self.models_for(inv.model.get("spec", plan.invert.model), todo[0].dtype, pfg)
            run_edits(ws, todo, log, models=models)
            return "run", {"why": "; ".join(reasons.values()), "edits_run": names, "edits_skipped": done,
                           "reasons": reasons}
        return "skipped", {"edits_run": [], "edits_skipped": done}

    def _export(self, plan: ClipPlan, ws_path: Path, job: Job, log: ClipLog) -> tuple[str, dict[str, Any]]:
        from stages.export import default_output, run_export
        from stages.io.storage import fetch_clip
        from stages.io.workspace import Workspace

        ws = Workspace.open(ws_path)
        todo, done = export_plan(ws, plan.export, plan.edit_names, fetch_clip(plan.clip, job.scratch))
        outputs = {name: str(default_output(ws.path, name, plan.export.codec)) for name in plan.edit_names}
        for cfg, _why in todo:
            run_export(ws, cfg, log)
        names = [cfg.edit for cfg, _why in todo]
        info: dict[str, Any] = {"outputs": outputs, "exports_run": names, "exports_skipped": done}
        if not todo:
            return "skipped", info
        reasons = {cfg.edit: why for cfg, why in todo}
        return "run", {**info, "why": "; ".join(reasons.values()), "reasons": reasons}

    def _eval(self, plan: ClipPlan, ws_path: Path, job: Job, log: ClipLog) -> tuple[str, dict[str, Any]]:
        from stages.evaluate import is_current, run_eval
        from stages.io import locks as stagelock
        from stages.io.workspace import Workspace

        ws = Workspace.open(ws_path)
        cfg = self._device(plan.eval)
        scorers = self._scorers_for(cfg)
        with stagelock.scope():  # frames and masks must not change while they are scored
            stagelock.hold(ws.path, stagelock.WORKSPACE, "vd batch", f"workspace {ws.path}", shared=True)
            fresh, why = is_current(ws, cfg, scorers)
            result = run_eval(ws, cfg, log, scorers, reuse=True)
        metrics = {n: item["metrics"] for n, item in result["items"].items()}
        return ("skipped", {"metrics": metrics}) if fresh else ("run", {"why": why, "metrics": metrics})


def _remote(path: Path, local: Path, target: str) -> str:
    """Where a file of the workspace's local copy lives in the batch's output (`target`: a folder or a URL)."""
    try:
        rel = path.relative_to(local)
    except ValueError:  # not inside the workspace
        return str(path)
    from stages.io.storage import is_url

    return f"{target.rstrip('/')}/{rel.as_posix()}" if is_url(target) else str(Path(target) / rel)
