"""Where batch workers run, behind one interface (`Engine`): in this process (LocalEngine: the caller's
thread, or a ThreadPoolExecutor) or as Ray Core actors (RayEngine). Clips go to whichever worker is free.

Ray: each actor asks for `threads` CPUs and `gpus` GPUs (never a share of the cluster's total, so it fits
on one node); actors that do not start within the schedule timeout stop the batch with one line naming the
request and what the cluster offers. A lost actor is restarted by Ray (max_restarts); its clip comes back
marked `worker_lost`, and the driver reruns it (LOST_WORKER_RERUNS, besides --retry) on whichever healthy
actor is free, never on the restarting one: an actor whose call failed gets no clip until a probe call answers again (and is dropped
when Ray gives up on it). Actors get only the FORWARD_ENV settings of the driver's environment, and a local
cluster vd starts inherits only NODE_ENV (so no Ray process holds a token or credential of the driver).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol

from stages.batch.worker import Job, Worker, clip_result
from stages.common.errors import UsageError, first_line

ENGINES = ("local", "ray")
DEFAULT_THREADS = 2  # CPUs (and torch threads) per Ray actor
SCHEDULE_TIMEOUT = 300.0  # seconds for the first Ray actor to start
ACTOR_RESTARTS = 3  # times Ray restarts a lost actor (a node gone, a crash)
PROBE_EVERY = 0.5  # seconds between probes of an actor Ray is restarting
# The only settings handed to Ray actors: not secret, and meaning the same on every machine. Tokens and
# credentials (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...) and this machine's paths (HF_HOME, HF_HUB_CACHE,
# VD_SD15, VD_SAM2_DIR, ...) are never forwarded: each node uses its own environment for those.
FORWARD_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "VD_DEBUG",
               "TOKENIZERS_PARALLELISM", "PYTORCH_CUDA_ALLOC_CONF", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
               "AWS_REGION", "AWS_DEFAULT_REGION")
# What the processes of a local cluster vd starts (GCS, raylet, every worker) inherit of the driver's
# environment: the system's and Ray's own settings, FORWARD_ENV and this machine's model paths (the local
# cluster IS this machine). Never a token, secret or credential (HF_TOKEN, AWS_SECRET_ACCESS_KEY,
# VD_DOWNLOAD_MIRROR which may carry a password): workers that need one read the standard files
# (~/.cache/huggingface/token, ~/.aws/credentials).
NODE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
            "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "CUDA_HOME",
            "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
            "XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "AWS_PROFILE", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE",
            *FORWARD_ENV)
NODE_PREFIXES = ("LC_", "RAY_", "VD_")  # locale, Ray's own configuration, vd's model paths
NEVER_ENV = ("VD_DOWNLOAD_MIRROR",)
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "API_KEY", "ACCESS_KEY", "PRIVATE", "SESSION")


class Engine(Protocol):
    """What the batch driver needs of an engine."""

    size: int  # workers, so clips in flight at once

    def capacity(self) -> int:
        """Clips that may be in flight now (started workers)."""

    def submit(self, job: Job) -> Any:
        """Start a clip on a free worker; returns a handle for `wait`."""

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        """(handle, clip result) of the calls that finished within `timeout` seconds."""

    def events(self) -> list[dict[str, Any]]:
        """Worker status events not delivered directly."""

    def gone(self) -> str | None:
        """Why no worker is left to run a clip, or None."""

    def stats(self) -> list[dict[str, Any]]:
        """Each worker's counters (Worker.stats)."""

    def interrupt(self) -> None:
        """Stop handing out work (Ctrl-C)."""

    def close(self) -> None:
        """Release the workers."""


@dataclass
class EngineOptions:
    """Where and how big the workers are (BatchOptions' engine part)."""

    kind: str = "local"
    workers: int | None = None
    address: str | None = None
    gpus_per_worker: float | None = None
    threads_per_worker: int | None = None
    schedule_timeout: float = SCHEDULE_TIMEOUT
    retry: int = 0
    verbose: bool = False


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def actor_env(threads: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables a Ray actor gets: FORWARD_ENV from `environ` (os.environ) and the thread
    settings, nothing else."""
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in FORWARD_ENV if environ.get(k)}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def node_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a local cluster vd starts inherits of `environ` (os.environ): NODE_ENV and NODE_PREFIXES, never a
    name in NEVER_ENV or one that names a secret (Ray's own RAY_* settings aside: its processes hold those)."""
    environ = os.environ if environ is None else environ

    def kept(name: str) -> bool:
        if name.startswith("RAY_"):
            return True
        if name in NEVER_ENV or any(word in name.upper() for word in SECRET_WORDS):
            return False
        return name in NODE_ENV or name.startswith(NODE_PREFIXES)

    return {k: v for k, v in environ.items() if kept(k)}


@contextlib.contextmanager
def scrubbed_environ() -> Iterator[None]:
    """Within the block os.environ holds only node_env(): processes started meanwhile (a local Ray cluster)
    inherit nothing else; the driver gets the rest back afterwards."""
    keep = node_env()
    removed = {k: v for k, v in os.environ.items() if k not in keep}
    for key in removed:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in removed.items():
            os.environ.setdefault(key, value)


def default_gpus(devices: list[str], cluster_gpus: float) -> float:
    """GPUs per Ray worker when --gpus-per-worker is not given: 1 when a clip asks for a CUDA device, 0 when
    every clip asks for the CPU, else 1 when the cluster has GPUs now (an autoscaling cluster whose GPU
    nodes start at zero needs --gpus-per-worker 1 or `device: cuda`)."""
    if any(str(d).startswith("cuda") for d in devices):
        return 1.0
    if devices and all(str(d) == "cpu" for d in devices):
        return 0.0
    return 1.0 if cluster_gpus >= 1 else 0.0


def start_engine(opts: EngineOptions, clips: int, devices: list[str],
                 events: Callable[[dict[str, Any]], None]) -> Engine:
    """The engine of `opts` with its workers started (at most one per clip); `events` shows local events."""
    if opts.kind == "local":
        count = max(1, min(opts.workers or 1, clips))
        return LocalEngine(count, opts.threads_per_worker or max(1, cores() // count), events, opts.verbose)
    return RayEngine(opts, clips, devices)


class LocalEngine:
    """In-process workers: the caller's thread for one worker (Ctrl-C reaches the stage), threads for more."""

    def __init__(self, workers: int, threads: int, events: Callable[[dict[str, Any]], None], verbose: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.size = workers
        self.stop = threading.Event()
        devices = _local_devices(workers)
        self.workers = [Worker(i, threads, devices[i], events, self.stop, verbose) for i in range(workers)]
        self._free: deque[Worker] = deque(self.workers)
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="vd-batch") if workers > 1 else None

    def capacity(self) -> int:
        return self.size

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

    def gone(self) -> str | None:
        return None

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


def _resources(values: Mapping[str, Any]) -> str:
    """"CPU 4, GPU 1" from a Ray resource mapping (the schedulable kinds only)."""
    return ", ".join(f"{k} {float(values.get(k, 0)):g}" for k in ("CPU", "GPU"))


class RayEngine:
    """Ray Core actors, one Worker (and so one model) each; clips go to whichever started actor is free."""

    def __init__(self, opts: EngineOptions, clips: int, devices: list[str]):
        import ray
        from ray.util.queue import Queue

        from stages.common.quiet import debugging

        self.ray = ray
        verbose = opts.verbose or debugging()
        if not verbose:  # Ray's own notices (e.g. about its token authentication) are not vd's lines
            logging.getLogger("ray").setLevel(logging.ERROR)
        self.started = not ray.is_initialized()
        if self.started:  # actors' output reaches this terminal only when asked for (-v, VD_DEBUG)
            with scrubbed_environ():  # a local cluster started now inherits no secret of this process
                ray.init(address=opts.address, include_dashboard=False, configure_logging=False,
                         log_to_driver=verbose)
        total = ray.cluster_resources()
        self.gpus = (float(opts.gpus_per_worker) if opts.gpus_per_worker is not None
                     else default_gpus(devices, float(total.get("GPU", 0))))
        self.threads = int(opts.threads_per_worker or DEFAULT_THREADS)
        workers = opts.workers
        if workers is None:
            workers = (int(float(total.get("GPU", 0)) // self.gpus) if self.gpus
                       else len([n for n in ray.nodes() if n.get("Alive")]))
        self.size = max(1, min(int(workers), clips))
        self.timeout = float(opts.schedule_timeout)
        # max_task_retries 0: Ray would retry a lost clip on the same, restarting actor; the driver retries it
        # (--retry, opts.retry) on a healthy one instead
        self.options = {"num_cpus": self.threads, "num_gpus": self.gpus, "max_restarts": ACTOR_RESTARTS,
                        "max_task_retries": 0, "runtime_env": {"env_vars": actor_env(self.threads)}}
        self.queue = Queue(actor_options={"num_cpus": 0})
        cls = ray.remote(Worker)
        self.actors = [cls.options(**self.options).remote(i, self.threads, None, self.queue, None, verbose)
                       for i in range(self.size)]
        self.starting = {actor.stats.remote(): actor for actor in self.actors}
        self.recovering: dict[Any, tuple[Any, float]] = {}  # probe -> (actor whose call failed, since when)
        self.later: list[tuple[float, Any, float]] = []  # (probe again at, actor, since when)
        self.idle: list[Any] = []
        self.calls: dict[Any, tuple[Any, Job]] = {}
        self.dead: list[dict[str, Any]] = []
        self.deadline = time.monotonic() + self.timeout
        self.ever_started = False
        self.notes: list[dict[str, Any]] = []
        self.noted = False

    def capacity(self) -> int:
        return len(self.idle) + len(self.calls)

    def submit(self, job: Job) -> Any:
        actor = self.idle.pop(0)
        ref = actor.run_clip.remote(job)
        self.calls[ref] = (actor, job)
        return ref

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        ray = self.ray
        self._probe_due()
        refs = list(handles) + list(self.starting) + list(self.recovering)
        if not refs:
            if self.later:  # only actors waiting to be probed again
                time.sleep(max(0.0, min(timeout, self.later[0][0] - time.monotonic())))
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            if ref in self.starting:
                self._started(ref)
                continue
            if ref in self.recovering:
                self._recovered(ref)
                continue
            actor, job = self.calls.pop(ref)
            try:
                out.append((ref, ray.get(ref)))
                self.idle.append(actor)
            except ray.exceptions.RayActorError as exc:  # killed, restarting, or gone for good
                self._probe(actor, time.monotonic())  # no clip for it until it answers again
                out.append((ref, _failure(job, f"worker lost: {first_line(exc)}", exc, lost=True)))
            except ray.exceptions.RayTaskError as exc:
                self.idle.append(actor)
                out.append((ref, _failure(job, first_line(exc), exc)))
        self._check_schedule()
        return out

    def _probe(self, actor: Any, since: float) -> None:
        """Ask a suspect actor for its stats: it is handed clips again once that answers."""
        self.recovering[actor.stats.remote()] = (actor, since)

    def _probe_due(self) -> None:
        now = time.monotonic()
        due = [item for item in self.later if item[0] <= now]
        self.later = [item for item in self.later if item[0] > now]
        for _, actor, since in due:
            self._probe(actor, since)

    def _recovered(self, ref: Any) -> None:
        ray = self.ray
        actor, since = self.recovering.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.ActorDiedError as exc:  # Ray will not restart it (again)
            self._lose(actor, exc)
        except ray.exceptions.RayActorError as exc:  # still restarting
            if time.monotonic() - since > self.timeout:
                self._lose(actor, exc)
            else:
                self.later.append((time.monotonic() + PROBE_EVERY, actor, since))
                self.later.sort(key=lambda item: item[0])
        except ray.exceptions.RayError as exc:
            self._lose(actor, exc)
        else:
            self.idle.append(actor)

    def _started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # its constructor failed on every restart
            self._lose(actor, exc)
            return
        self.ever_started = True
        self.idle.append(actor)

    def _lose(self, actor: Any, exc: BaseException) -> None:
        if actor in self.actors:
            self.dead.append({"worker": self.actors.index(actor), "error": first_line(exc), "lost": True})
        self.idle = [a for a in self.idle if a is not actor]

    def _check_schedule(self) -> None:
        if not self.starting or time.monotonic() < self.deadline:
            return
        asked = f"{_resources({'CPU': self.threads, 'GPU': self.gpus})} per worker"
        offers = (f"the cluster has {_resources(self.ray.available_resources())} available "
                  f"(of {_resources(self.ray.cluster_resources())})")
        if not self.ever_started and not self.idle and not self.calls:
            raise UsageError(f"no Ray worker started within {self.timeout:g} s: {len(self.starting)} worker(s) "
                             f"ask for {asked}; {offers}; use --threads-per-worker / --gpus-per-worker / "
                             f"--workers to ask for less, or add nodes")
        if not self.noted:
            self.noted = True
            self.notes.append({"kind": "note", "message": f"batch: {len(self.starting)} of {self.size} Ray "
                               f"worker(s) not started within {self.timeout:g} s ({asked}; {offers}); "
                               f"continuing with the others"})

    def events(self) -> list[dict[str, Any]]:
        notes, self.notes = self.notes, []
        try:
            count = self.queue.qsize()
            return notes + (list(self.queue.get_nowait_batch(count)) if count else [])
        except Exception:
            return notes

    def gone(self) -> str | None:
        if self.idle or self.calls or self.starting or self.recovering or self.later:
            return None
        last = self.dead[-1]["error"] if self.dead else "unknown"
        return f"no Ray worker left ({len(self.dead)} lost; last: {last})"

    def stats(self) -> list[dict[str, Any]]:
        live = [a for a in self.actors if a in self.idle]
        refs = [a.stats.remote() for a in live]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=30) if refs else ([], [])
        out = []
        for ref in ready:
            try:
                out.append(self.ray.get(ref))
            except Exception:
                pass
        return out + self.dead

    def interrupt(self) -> None:
        for ref in list(self.calls):  # queued calls; running ones end when close() kills their actors
            try:
                self.ray.cancel(ref)
            except Exception:
                pass

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        try:
            self.queue.shutdown()
        except Exception:
            pass
        if self.started:
            self.ray.shutdown()


def _failure(job: Job, error: str, exc: BaseException | None = None, lost: bool = False) -> dict[str, Any]:
    """The result of a clip whose worker failed outside the clip's own code; `exc`'s text goes to its log.
    `lost`: the worker itself died (killed, node gone), so the driver reruns the clip on a healthy one."""
    log = str(exc).strip().splitlines()[:20] if exc is not None else None
    return clip_result(job, None, status="failed", error=error, transient=True, seconds=None, log=log,
                       worker_lost=lost)

