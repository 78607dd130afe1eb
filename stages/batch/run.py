"""`vd batch`: mask -> invert -> edit -> eval over the clips of a manifest, on local workers or Ray actors.

Each worker holds its models (one load per model spec, reused for all its clips and stages) and runs
whole clips, stage by stage, through the stages' own entry points. A stage already complete with the
same settings is skipped, using what the workspace records (mask: the batch's record of the clip and
mask settings; inversion: status, done flags and stored settings; edits: status and params; eval: the
stored results' fingerprints), so rerunning a batch resumes it. Clips go to whichever worker is free
(ThreadPoolExecutor locally, ray.wait over actor calls on Ray). A failing clip never stops the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stages.common.errors import InputError, Interrupted, UsageError, VdError
from stages.batch.manifest import ClipPlan, Manifest
from stages.io.storage import is_url
from stages.common.progress import Progress
from stages.common.errors import first_line

STAGES = ("mask", "invert", "edit", "eval")
ENGINES = ("local", "ray")
# settings an edit's stored params may differ in without the edit being stale
EDIT_RUNTIME = ("force", "device", "dtype", "output")
# non-secret environment handed to Ray actors (credentials stay with each node's own environment)
FORWARD_ENV = ("VD_", "HF_", "TRANSFORMERS_OFFLINE", "FSSPEC_", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
_LOAD_LOCK = threading.Lock()  # model builders seed torch's global RNG: one load at a time per process


@dataclass
class BatchOptions:
    """Options of `vd batch` besides the manifest."""

    engine: str = "local"
    address: str | None = None
    workers: int | None = None  # None: 1 locally; Ray: one per GPU slot, else one per node
    gpus_per_worker: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0
    threads_per_worker: int | None = None  # None: cores // workers
    out: str = "runs"
    only: list[str] = field(default_factory=lambda: list(STAGES))
    retry: int = 0
    scratch: str | None = None


@dataclass
class Job:
    """One clip to run (sent to a worker)."""

    plan: ClipPlan
    target: str
    only: list[str]
    scratch: str | None
    attempt: int = 0


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int) -> None:
    """Torch/OpenMP threads for this worker (workers share the cores instead of oversubscribing them)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(max(1, int(threads)))


# ----------------------------------------------------------------------------------------- worker
class Worker:
    """A batch worker: loads each model once and runs whole clips. `events` receives status dicts (a
    callable, or a Ray queue with put_nowait); `stop` (local threads) ends a run between stages."""

    def __init__(self, index: int, threads: int, device: str | None = None, events: Any = None,
                 stop: threading.Event | None = None):
        self.index = index
        self.threads = threads
        self.device = device
        self.events = events
        self.stop = stop
        self.loads = 0
        self._models: dict[tuple[Any, ...], Any] = {}
        self._scorers: dict[str, Any] = {}
        set_threads(threads)

    def stats(self) -> dict[str, Any]:
        """This worker's counters."""
        import socket

        return {"worker": self.index, "model_loads": self.loads, "threads": self.threads, "pid": os.getpid(),
                "host": socket.gethostname(), "device": self.device}

    def emit(self, **event: Any) -> None:
        event["worker"] = self.index
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

    def _scorers_for(self, cfg: Any) -> Any:
        import json

        from stages.evaluate.run import Scorers

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
        """Run the clip's stages; a failure is reported in the result (one line), never raised."""
        from stages.io.storage import Storage

        plan = job.plan
        result: dict[str, Any] = {
            "index": plan.index, "name": plan.name, "clip": plan.clip, "workspace": job.target,
            "worker": self.index, "attempt": job.attempt, "status": "running", "error": None, "stage": None,
            "transient": False, "stages": {}, "run": [], "skipped": [], "metrics": None, "model_loads": 0}
        loads, start = self.loads, time.perf_counter()
        state = {"invert_ran": False, "local": None}
        stage = "sync"
        try:
            storage = Storage(job.target, job.scratch)
            storage.pull()
            state["local"] = storage.local
            for stage in STAGES:
                if stage not in job.only:
                    continue
                if self.stop is not None and self.stop.is_set():
                    raise Interrupted("batch interrupted")
                self.emit(kind="start", clip=plan.name, stage=stage)
                t0 = time.perf_counter()
                status, info = getattr(self, f"_{stage}")(plan, storage.local, state, job)
                seconds = round(time.perf_counter() - t0, 3)
                storage.push(stage)
                if stage == "eval":
                    result["metrics"] = info.pop("metrics", None)
                result["stages"][stage] = {"status": status, "seconds": seconds, **info}
                result["run" if status == "run" else "skipped"].append(stage)
                self.emit(kind="end", clip=plan.name, stage=stage, status=status, seconds=seconds)
            stage = None
            result["status"] = "done"
            storage.cleanup()
        except (Interrupted, KeyboardInterrupt):
            raise
        except VdError as exc:
            result.update(status="failed", error=first_line(exc), stage=stage)
        except Exception as exc:  # unexpected: may be transient (I/O, a lost node, CUDA OOM): --retry
            result.update(status="failed", error=f"{type(exc).__name__}: {first_line(exc)}", stage=stage,
                          transient=True)
        if result["status"] == "failed":
            self.emit(kind="failed", clip=plan.name, stage=stage, error=result["error"])
        result["model_loads"] = self.loads - loads
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result

    # ------------------------------------------------------------------ stages
    def _mask(self, plan: ClipPlan, ws_path: Path, state: dict[str, Any], job: Job) -> tuple[str, dict[str, Any]]:
        from stages.io import video as vid
        from stages.common.config import config_dict, config_hash
        from stages.mask.run import run_mask
        from stages.io.storage import fetch_clip
        from stages.io.workspace import Workspace

        clip = fetch_clip(plan.clip, job.scratch)
        if not Path(clip).exists():
            raise InputError(f"clip {plan.clip} not found")
        sha = vid.source_sha256(clip)
        settings = {k: v for k, v in config_dict(plan.mask).items() if k not in ("device", "force")}
        key = config_hash({"clip_sha256": sha, "mask": settings})
        if _mask_current(ws_path, sha, key):
            return "skipped", {}
        result = run_mask(clip, ws_path, self._device(plan.mask), Progress(quiet=True))
        ws = Workspace.open(ws_path)
        masks = ws.group_attrs("masks")
        _record(ws, "mask", {"key": key, "created": masks.get("created"), "edit_sha256": masks.get("edit_sha256")})
        return "run", {"coverage": round(sum(result["mask"]["coverage_edit"]) / max(result["frames"], 1), 4)}

    def _invert(self, plan: ClipPlan, ws_path: Path, state: dict[str, Any], job: Job) -> tuple[str, dict[str, Any]]:
        from stages.invert.run import run_invert
        from stages.io.workspace import Workspace

        ws = Workspace.open(ws_path)
        cfg = self._device(dataclasses.replace(plan.invert))
        found = inversion_state(ws, cfg)
        if found == "done":
            return "skipped", {"recon_psnr": (ws.group_attrs("inversion").get("recon") or {}).get("psnr")}
        cfg.restart = found == "stale"
        models = self.models_for(cfg.model, cfg.dtype, cfg.per_frame_groupnorm)
        result = run_invert(ws, cfg, Progress(quiet=True), models=models)
        if result.get("already_done"):
            return "skipped", {"recon_psnr": (result.get("recon") or {}).get("psnr")}
        state["invert_ran"] = True
        return "run", {"resumed": found == "partial", "restarted": found == "stale",
                       "recon_psnr": (result.get("recon") or {}).get("psnr")}

    def _edit(self, plan: ClipPlan, ws_path: Path, state: dict[str, Any], job: Job) -> tuple[str, dict[str, Any]]:
        from stages.common.config import config_dict
        from stages.edit.run import load_inversion_for_edit, plan_edit, run_edits
        from stages.io.workspace import Workspace

        if not plan.edits:
            return "skipped", {"edits_run": [], "edits_skipped": []}
        ws = Workspace.open(ws_path)
        inv = load_inversion_for_edit(ws)
        inversion = inv.attrs.get("config_hash")
        made_from = (ws.attrs.get("batch") or {}).get("edits") or {}  # edit name -> inversion it was made from
        todo, done, names = [], [], []
        for cfg in plan.edits:
            cfg = self._device(dataclasses.replace(cfg, force=True))
            name = plan_edit(ws, inv, cfg).name
            stored = ws.group_attrs(f"edits/{name}")
            if not state["invert_ran"] and stored.get("status") == "done" and made_from.get(name) == inversion \
                    and _same_params(stored.get("params") or {}, config_dict(cfg)):
                done.append(name)
            else:
                todo.append(cfg)
                names.append(name)
        if todo:
            pfg = (inv.attrs.get("config") or {}).get("per_frame_groupnorm", True)
            models = self.models_for(inv.model.get("spec", plan.invert.model), todo[0].dtype, pfg)
            run_edits(ws, todo, Progress(quiet=True), models=models)
            _record(ws, "edits", {**made_from, **{name: inversion for name in names}})
        return ("run" if todo else "skipped"), {"edits_run": names, "edits_skipped": done}

    def _eval(self, plan: ClipPlan, ws_path: Path, state: dict[str, Any], job: Job) -> tuple[str, dict[str, Any]]:
        from stages.io import locks as stagelock
        from stages.evaluate.run import run_eval
        from stages.io.workspace import Workspace

        ws = Workspace.open(ws_path)
        cfg = self._device(plan.eval)
        with stagelock.scope():  # frames and masks must not change while they are scored
            stagelock.hold(ws.path, stagelock.WORKSPACE, "vd batch", f"workspace {ws.path}", shared=True)
            result = run_eval(ws, cfg, Progress(quiet=True), self._scorers_for(cfg), reuse=True)
        items = result["items"]
        reused = bool(items) and all(item.get("reused") for item in items.values())
        return ("skipped" if reused else "run"), {"metrics": {n: item["metrics"] for n, item in items.items()}}


def _record(ws: Any, key: str, value: Any) -> None:
    """Merge `value` into the batch's own record (root attribute `batch`) of what it made and from what."""
    with ws.lock():
        import zarr

        group = zarr.open_group(str(ws.path), mode="r+")
        record = dict(group.attrs.get("batch") or {})
        record[key] = value
        group.attrs.update({"batch": record})


def _mask_current(ws_path: Path, sha: str, key: str) -> bool:
    """Whether the workspace holds masks made by a batch from this clip content with these settings (and
    not replaced since, e.g. by a manual `vd mask`)."""
    from stages.io.workspace import Workspace

    if not (ws_path / "zarr.json").is_file():
        return False
    try:
        ws = Workspace.open(ws_path)
        attrs = ws.attrs
    except VdError:
        return False
    record = (attrs.get("batch") or {}).get("mask") or {}
    masks = ws.group_attrs("masks")
    return (ws.has("video/frames") and ws.has("masks/edit") and (attrs.get("source") or {}).get("sha256") == sha
            and record.get("key") == key and record.get("created") == masks.get("created")
            and record.get("edit_sha256") == masks.get("edit_sha256"))


def inversion_state(ws: Any, cfg: Any) -> str:
    """The stored inversion against `cfg`: "none", "done" (same settings, complete), "partial" (same
    settings, resumable) or "stale" (other settings or other frames/masks: redo with restart)."""
    import numpy as np

    from stages.common.config import changed_settings
    from stages.invert.run import GROUP, stored_settings

    stored = ws.group_attrs(GROUP)
    if not stored.get("settings"):
        return "none"
    frames = ws.read("video/frames")
    mask = ws.read("masks/edit") if ws.has("masks/edit") else None
    new = stored_settings(cfg, frames, mask)
    old = {k: v for k, v in stored["settings"].items() if k in new}
    if changed_settings(old, new):
        return "stale"
    done = ws.read(f"{GROUP}/done") if ws.has(f"{GROUP}/done") else np.zeros(1, bool)
    complete = stored.get("status") == "done" and bool(done.all())
    if complete and cfg.compare_ddim and "ddim_psnr" not in (stored.get("recon") or {}):
        complete = False
    return "done" if complete else "partial"


def _same_params(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in EDIT_RUNTIME}

    return strip(stored) == strip(current)


# ----------------------------------------------------------------------------------------- engines
class LocalEngine:
    """In-process workers: the caller's thread for one worker (Ctrl-C reaches the stage), threads for more."""

    def __init__(self, workers: int, threads: int, events: Callable[[dict[str, Any]], None]):
        from concurrent.futures import ThreadPoolExecutor

        self.size = workers
        self.stop = threading.Event()
        devices = _local_devices(workers)
        self.workers = [Worker(i, threads, devices[i], events, self.stop) for i in range(workers)]
        self._free: deque[Worker] = deque(self.workers)
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="vd-batch") if workers > 1 else None

    def submit(self, job: Job) -> Any:
        from concurrent.futures import Future

        if self.pool is not None:
            return self.pool.submit(self._run, job)
        future: Future = Future()
        future.set_result(self._run(job))
        return future

    def _run(self, job: Job) -> dict[str, Any]:
        with self._lock:
            worker = self._free.popleft()
        try:
            return worker.run_clip(job)
        finally:
            with self._lock:
                self._free.append(worker)

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return [(f, f.result()) for f in done]

    def events(self) -> list[dict[str, Any]]:
        return []  # delivered directly by the workers

    def stats(self) -> list[dict[str, Any]]:
        return [w.stats() for w in self.workers]

    def interrupt(self) -> None:
        self.stop.set()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _local_devices(workers: int) -> list[str | None]:
    """One GPU per local worker when several workers share a machine with GPUs (else the stages' auto)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if workers > 1 and count > 1:
        return [f"cuda:{i % count}" for i in range(workers)]
    return [None] * workers


class RayEngine:
    """Ray Core actors, one Worker (and so one model) each; clips go to whichever actor is free."""

    def __init__(self, workers: int | None, address: str | None, gpus_per_worker: float | None,
                 threads: int | None):
        import ray
        from ray.util.queue import Queue

        from stages.common.quiet import debugging

        self.ray = ray
        if not debugging():  # Ray's own notices (e.g. about its token authentication) are not vd's lines
            logging.getLogger("ray").setLevel(logging.ERROR)
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
        per_gpu = float(gpus_per_worker) if gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
        if per_gpu > gpus:
            raise UsageError(f"--gpus-per-worker {per_gpu:g}: the Ray cluster has {gpus:g} GPU(s)")
        if workers is None:
            workers = int(gpus // per_gpu) if per_gpu else len([n for n in ray.nodes() if n.get("Alive")])
        self.size = max(1, int(workers))
        share = cpus / self.size
        num_cpus = share if share < 1 else float(int(share))  # fractional when workers outnumber cores
        self.threads = int(threads or max(1, int(share)))
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self.options = {"num_cpus": num_cpus, "num_gpus": per_gpu, "runtime_env": {"env_vars": env}}
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.cls = ray.remote(Worker)
        self.actors = [self._actor(i) for i in range(self.size)]
        self.idle = list(self.actors)
        self.calls: dict[Any, tuple[Any, Job]] = {}
        self.lost: list[dict[str, Any]] = []

    def _actor(self, index: int) -> Any:
        return self.cls.options(**self.options).remote(index, self.threads, None, self.queue)

    def submit(self, job: Job) -> Any:
        actor = self.idle.pop(0)
        ref = actor.run_clip.remote(job)
        self.calls[ref] = (actor, job)
        return ref

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        ray = self.ray
        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            actor, job = self.calls.pop(ref)
            try:
                out.append((ref, ray.get(ref)))
                self.idle.append(actor)
            except ray.exceptions.RayActorError as exc:  # the actor (its node) died: replace it, retry
                index = self.actors.index(actor)
                self.actors[index] = self._actor(index)
                self.idle.append(self.actors[index])
                self.lost.append({"worker": index, "error": first_line(exc)})
                out.append((ref, _failure(job, f"worker lost: {first_line(exc)}")))
            except ray.exceptions.RayTaskError as exc:
                self.idle.append(actor)
                out.append((ref, _failure(job, f"{first_line(exc)}")))
        return out

    def events(self) -> list[dict[str, Any]]:
        try:
            count = self.queue.qsize()
            return list(self.queue.get_nowait_batch(count)) if count else []
        except Exception:
            return []

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for actor in self.actors:
            try:
                out.append(self.ray.get(actor.stats.remote(), timeout=30))
            except Exception:
                pass
        return out + [{**lost, "lost": True} for lost in self.lost]

    def interrupt(self) -> None:
        for ref in list(self.calls):  # queued calls; running ones end when close() kills their actors
            try:
                self.ray.cancel(ref)
            except Exception:
                pass

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        try:
            self.queue.shutdown()
        except Exception:
            pass
        if self.started:
            self.ray.shutdown()


def _failure(job: Job, error: str) -> dict[str, Any]:
    plan = job.plan
    return {"index": plan.index, "name": plan.name, "clip": plan.clip, "workspace": job.target, "worker": None,
            "attempt": job.attempt, "status": "failed", "error": error, "stage": None, "transient": True,
            "stages": {}, "run": [], "skipped": [], "metrics": None, "model_loads": 0, "seconds": None}


# ----------------------------------------------------------------------------------------- driver
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
    show = _status_printer(progress)
    if opts.engine == "local":
        workers = opts.workers or 1
        engine: Any = LocalEngine(workers, opts.threads_per_worker or max(1, cores() // workers), show)
    else:
        engine = RayEngine(opts.workers, opts.address, opts.gpus_per_worker, opts.threads_per_worker)
    progress.log(f"batch: {len(jobs)} clip(s), engine {opts.engine}, {engine.size} worker(s), out {out}")
    results: dict[int, dict[str, Any]] = {}
    stats: list[dict[str, Any]] = []
    try:
        with progress.task("batch", total=len(jobs)) as advance:
            pending, running = deque(jobs), {}
            while pending or running:
                while pending and len(running) < engine.size:
                    job = pending.popleft()
                    running[engine.submit(job)] = job
                for handle, res in engine.wait(list(running), 0.5):
                    job = running.pop(handle)
                    if res["status"] == "failed" and res.get("transient") and job.attempt < opts.retry:
                        job.attempt += 1
                        progress.log(f"{job.plan.name}: {res['error']}; retry {job.attempt}/{opts.retry}")
                        pending.append(job)
                        continue
                    results[job.plan.index] = res
                    failed = sum(r["status"] == "failed" for r in results.values())
                    advance(1, done=len(results) - failed, failed=failed)
                for event in engine.events():
                    show(event)
    except KeyboardInterrupt:
        engine.interrupt()
        raise Interrupted("batch interrupted; finished stages are kept in the workspaces, rerun the same "
                          "command to resume") from None
    finally:
        try:
            stats = engine.stats()
        finally:
            engine.close()
    return _report(manifest, opts, out, [results[k] for k in sorted(results)], stats, engine.size,
                   time.perf_counter() - started)


def _status_printer(progress: Progress) -> Callable[[dict[str, Any]], None]:
    """Per-worker status lines from worker events."""
    lock = threading.Lock()

    def show(event: dict[str, Any]) -> None:
        who = f"[worker {event.get('worker')}] {event.get('clip')}"
        kind = event.get("kind")
        if kind == "start":
            line = f"{who}: {event.get('stage')} ..."
        elif kind == "end":
            line = f"{who}: {event.get('stage')} {event.get('status')} ({float(event.get('seconds') or 0):.1f} s)"
        else:
            line = f"{who}: FAILED in {event.get('stage')}: {event.get('error')}"
        with lock:
            progress.log(line)

    return show


def _report(manifest: Manifest, opts: BatchOptions, out: str, results: list[dict[str, Any]],
            stats: list[dict[str, Any]], workers: int, seconds: float) -> dict[str, Any]:
    done = [r for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] != "done"]
    loads = sum(int(r.get("model_loads") or 0) for r in results)
    return {
        "manifest": str(manifest.path), "engine": opts.engine, "workers": workers, "out": out,
        "only": list(opts.only), "clips": results,
        "counts": {"clips": len(results), "done": len(done), "failed": len(failed),
                   "stages_run": sum(len(r["run"]) for r in results),
                   "stages_skipped": sum(len(r["skipped"]) for r in results)},
        "failed": [{"name": r["name"], "stage": r.get("stage"), "error": r["error"]} for r in failed],
        "model_loads": {"total": loads, "per_worker": stats},
        "seconds": round(seconds, 2),
        "clips_per_hour": round(len(done) * 3600.0 / seconds, 1) if seconds > 0 else None,
        "compare": compare_table(results),
    }


def compare_table(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The `vd eval --compare` table (same shape and grouping) over the clips' eval results."""
    from stages.evaluate.run import compare_groups

    per_clip = {r["workspace"]: r["metrics"] for r in results if r.get("metrics")}
    if not per_clip:
        return None
    return {"clips": list(per_clip), "groups": compare_groups(per_clip), "per_clip": per_clip}
