"""One writer per stage: exclusive locks on what a stage writes, held for its whole run.

A lock is an `fcntl.flock` on a file in `<workspace>/.locks/` (`inversion.lock`, `edits__<name>.lock`,
`workspace.lock`). The kernel drops the lock when its process dies, so a killed run never blocks the
next one; the file's JSON (pid, host, start time, command) names the holder in the refusal message, and
a file left by a dead process is simply taken over. `vd mask` holds `workspace` exclusively; the other
stages hold it shared, so masks and frames cannot change under a running inversion or edit.

Use: decorate the stage entry point with `@scoped` and call `hold(...)` once the run is known to be
valid; everything held is released when the decorated call returns or raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import functools
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from stages.common.errors import InputError
from stages.io.workspace import LOCK_DIR

WORKSPACE = "workspace"  # the whole workspace (vd mask exclusive, the other stages shared)
F = TypeVar("F", bound=Callable[..., Any])
_scope: contextvars.ContextVar[list["Lock"] | None] = contextvars.ContextVar("vd_lock_scope", default=None)


class StageBusy(InputError):
    """Another process is writing (or reading) what this run wants to write."""


def lock_path(workspace: str | Path, name: str) -> Path:
    """The lock file of stage `name` ("inversion", "edits/<name>", "workspace") in a workspace."""
    return Path(workspace) / LOCK_DIR / (name.strip("/").replace("/", "__") + ".lock")


def _proc_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # gone, or not ours to inspect
        return None


def holder(workspace: str | Path, name: str) -> dict[str, Any] | None:
    """The recorded exclusive holder of lock `name`, or None when free or left by a dead process.

    Reads the JSON only (never touches the lock itself), so `vd info` can show who is writing.
    A holder on another host cannot be checked and is reported as is.
    """
    info = _read_info(lock_path(workspace, name))
    if not info:
        return None
    return info if _alive(info) else None


def _read_info(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(info: dict[str, Any]) -> bool:
    if info.get("host") != socket.gethostname():
        return True
    try:
        pid = int(info.get("pid", -1))
    except (TypeError, ValueError):
        return False
    started = _proc_start(pid) if pid > 0 else None
    # a recycled pid belongs to a process started after the lock was taken
    return started is not None and started <= float(info.get("since", 0)) + 2.0


def describe(info: dict[str, Any]) -> str:
    """'pid 123 on host, started 2025-01-01T10:00:00, vd invert' (for messages)."""
    since = info.get("since")
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(float(since))) if since else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}, {info.get('command', 'vd')}"


class Lock:
    """One held lock (an open file descriptor with an flock on it)."""

    def __init__(self, path: Path, fd: int, shared: bool):
        self.path, self.fd, self.shared = path, fd, shared

    def release(self) -> None:
        """Drop the lock; the file goes too when no one else holds it."""
        if self.fd < 0:
            return
        try:  # remove the file only if we can have it exclusively (no other shared holder)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(self.fd, self.path):
                self.path.unlink()
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()  # only when empty
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1
            scope = _scope.get()
            if scope is not None and self in scope:
                scope.remove(self)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def acquire(workspace: str | Path, name: str, command: str, what: str | None = None,
            shared: bool = False) -> Lock:
    """Take lock `name` at once or raise StageBusy naming the holder. Prefer `hold` inside `@scoped`."""
    path = lock_path(workspace, name)
    what = what or f"{name} of {workspace}"
    for _ in range(20):  # retry only when the file was removed between open and flock
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            _busy(workspace, name, what, path)
        if not _same_file(fd, path):  # released and removed meanwhile: lock the new file instead
            os.close(fd)
            continue
        if not shared:
            _claim(fd, path, name, command, what)
        return Lock(path, fd, shared)
    raise StageBusy(f"could not lock {what}: {path} keeps changing; retry")


def _claim(fd: int, path: Path, name: str, command: str, what: str) -> None:
    old = _read_info(path)
    if old and old.get("pid") != os.getpid() and old.get("host") == socket.gethostname() and _alive(old):
        # flock granted although the recorded writer lives: a filesystem without working flock
        os.close(fd)
        raise StageBusy(f"{what} is being written by {describe(old)}; wait for it to finish or stop it")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": command,
            "stage": name}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _busy(workspace: str | Path, name: str, what: str, path: Path) -> None:
    info = _read_info(path)
    if info and _alive(info):
        raise StageBusy(f"{what} is being written by {describe(info)}; wait for it to finish or stop it")
    others = [h for h in (_read_info(p) for p in sorted(path.parent.glob("*.lock")) if p != path) if h and _alive(h)]
    who = f" ({'; '.join(describe(h) for h in others)})" if others else ""
    raise StageBusy(f"{what} is in use by another vd process{who}; wait for it to finish and retry")


def hold(workspace: str | Path, name: str, command: str, what: str | None = None, shared: bool = False) -> Lock:
    """Acquire lock `name` for the rest of the enclosing `@scoped` call (released when it ends)."""
    scope = _scope.get()
    if scope is None:
        raise RuntimeError("stagelock.hold() needs an enclosing @stagelock.scoped call")
    lock = acquire(workspace, name, command, what, shared)
    scope.append(lock)
    return lock


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Release every lock taken with `hold` inside this block when it ends."""
    token = _scope.set([])
    try:
        yield
    finally:
        held = _scope.get() or []
        for lock in reversed(list(held)):
            lock.release()
        _scope.reset(token)


def scoped(fn: F) -> F:
    """Decorator: the function's `hold` calls are released when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with scope():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
