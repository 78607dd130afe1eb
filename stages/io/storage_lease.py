"""The write lease of a remote workspace: one writer at a time.

The lease is a small object `.vd-lease.json` next to the workspace: {"owner", "token", "host", "pid",
"expires", "ttl"}. A writer takes it before it pulls, a background thread renews it (every ttl/3) while
the writer lives, and the writer checks it is still its own before it moves the sync pointer. A second
writer is refused with one line until the lease expires; then it takes the lease over (and the first
writer, should it wake up, finds it lost and stops). A lease left by a process that is provably gone (same
host: a dead pid, or this very process after the holder was dropped) is taken over at once.

Taking and renewing are atomic on file:// (under a file lock) and on S3 (conditional writes); on other
stores the writer reads the lease back after writing it, which narrows but does not close the race.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
import uuid
from typing import Any

from stages.common.errors import InputError
from stages.io import storage_remote as R

LEASE = ".vd-lease.json"
LEASE_S = 120.0
HOST = socket.gethostname()
_HELD: set[str] = set()  # tokens of the leases this process holds now


class LeaseHeld(InputError):
    """Another writer holds (or took over) the workspace's lease."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class Lease:
    """The lease on `path` (a remote object) for writer `owner`; `target` names the workspace in messages."""

    def __init__(self, fs: Any, path: str, target: str, ttl: float = LEASE_S, owner: str | None = None):
        self.fs, self.path, self.target, self.ttl = fs, path, target, float(ttl)
        self.token = uuid.uuid4().hex
        self.owner = owner or f"{HOST}:{os.getpid()}:{self.token[:8]}"
        self.held = False
        self.lost: str | None = None
        self._mutex = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file_lock: Any = None

    # ------------------------------------------------------------------ reading
    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(record, etag); a torn record reads as {} (no valid holder)."""
        tag = R.etag(self.fs, self.path) if R.backend(self.fs) == "s3" else None
        try:
            return R.read_json(self.fs, self.path), tag
        except R.Torn:
            return {}, tag

    def _free(self, rec: dict[str, Any] | None) -> bool:
        """May this writer take a lease whose record is `rec`?"""
        if not rec or rec.get("token") == self.token:
            return True
        try:
            expires, pid = float(rec["expires"]), int(rec["pid"])
        except (KeyError, TypeError, ValueError):
            return True  # not a lease anyone could hold
        if expires < time.time():
            return True
        if rec.get("host") == HOST:  # the holder is on this machine: is it still there?
            return (pid == os.getpid() and rec.get("token") not in _HELD) or (pid != os.getpid() and not _alive(pid))
        return False

    def _describe(self, rec: dict[str, Any] | None) -> str:
        rec = rec or {}
        left = max(0, round(float(rec.get("expires", 0) or 0) - time.time()))
        return f"{rec.get('owner', '?')}, lease valid for {left} more s"

    def _record(self) -> dict[str, Any]:
        return {"owner": self.owner, "token": self.token, "host": HOST, "pid": os.getpid(),
                "expires": time.time() + self.ttl, "ttl": self.ttl}

    # ------------------------------------------------------------------ writing
    def _take(self) -> dict[str, Any] | None:
        """Write our record if the lease is free; returns the blocking record otherwise."""
        for _ in range(3):
            rec, tag = self._read()
            if not self._free(rec):
                return rec
            if R.write_json(self.fs, self.path, self._record(), create=rec is None, if_match=tag):
                return None
        return self._read()[0] or {}  # lost three races in a row: someone is busy taking it

    def _locked(self, fn: Any) -> Any:
        """Run `fn` alone: under a file lock next to the lease on file:// (S3 relies on conditional
        writes instead)."""
        with self._mutex:
            if R.backend(self.fs) != "local":
                return fn()
            if self._file_lock is None:
                from filelock import FileLock

                local = self.fs._strip_protocol(self.path)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                self._file_lock = FileLock(local + ".lock", timeout=30)
            with self._file_lock:
                return fn()

    def acquire(self) -> None:
        """Take the lease (or confirm it is still ours); LeaseHeld when another writer has it."""
        with self._mutex:
            if self.lost:
                raise LeaseHeld(self.lost)
            if self.held:
                return
            blocker = self._locked(self._take)
            if blocker and blocker.get("host") == HOST and blocker.get("pid") == os.getpid():
                # held by a writer of this process: one that was dropped (a failed clip) may only wait
                # for the garbage collector, whose finalizer gives the lease back
                gc.collect()
                blocker = self._locked(self._take)
            if blocker is None:
                mine, _ = self._read()  # stores without conditional writes: the last writer wins
                if not mine or mine.get("token") != self.token:
                    blocker = mine
            if blocker is not None:
                raise LeaseHeld(f"remote workspace {self.target} is being written by another vd "
                                f"({self._describe(blocker)}); wait for it to finish or stop it")
            self.held = True
            _HELD.add(self.token)
            self._stop = threading.Event()  # a fresh one: a renewer of an earlier term may still be winding down
            self._thread = threading.Thread(target=self._renew_loop, args=(self._stop,), name="vd-lease",
                                            daemon=True)
            self._thread.start()

    def renew(self) -> bool:
        """Extend the lease; False (and `lost` set) when another writer took it over."""
        def step() -> bool:
            rec, tag = self._read()
            if not rec or rec.get("token") != self.token:
                self._lose(rec)
                return False
            if not R.write_json(self.fs, self.path, self._record(), if_match=tag):
                self._lose(self._read()[0])
                return False
            return True

        with self._mutex:
            return self.held and self._locked(step)

    def _lose(self, rec: dict[str, Any] | None) -> None:
        self.held = False
        _HELD.discard(self.token)
        self._stop.set()
        self.lost = (f"lost the write lease on {self.target} to another writer ({self._describe(rec)}); "
                     "this one stops")

    def _renew_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
            except Exception:  # a network hiccup: try again next period; check() decides
                continue

    def check(self) -> None:
        """Renew the lease, or raise LeaseHeld when another writer has taken it (called before the
        sync pointer moves)."""
        with self._mutex:
            if not self.held and not self.lost:
                self.acquire()
            elif self.lost or not self.renew():
                raise LeaseHeld(self.lost or f"lost the write lease on {self.target}")

    def release(self) -> None:
        """Give the lease back (best effort: an unreachable store lets it expire instead)."""
        self._stop.set()
        with self._mutex:
            was = self.held
            self.held = False
            _HELD.discard(self.token)
            if not was:
                return

            def drop() -> None:
                rec, _ = self._read()
                if rec and rec.get("token") == self.token:
                    R.remove(self.fs, self.path)

            try:
                self._locked(drop)
            except Exception:
                pass
