"""The write lease of a remote workspace: one writer at a time.

The lease is a small object `.vd-lease.json` next to the workspace: {"owner", "token", "host", "pid",
"pidns", "ttl", "beat"}. A writer takes it before it pulls, a background thread rewrites it (a heartbeat,
every ttl/3) while the writer lives, and the writer checks it is still its own before it moves the sync
pointer. Time is read on the STORE's clock only: a heartbeat is the lease object's modification time
(S3 LastModified, the file's mtime), and "now" is the modification time of the object `.vd-clock`, which
the taker rewrites to ask. A writer's own wall clock is never compared with another's, so a skewed
machine can neither take a live lease nor keep a dead one alive.

A second writer is refused with LeaseHeld, a Transient error (`vd batch --retry` retries it), while the
holder's heartbeats go on. A holder with no heartbeat for its TTL is dead and its lease is taken over (and
that holder, should it wake up, finds the lease lost and stops); `wait=True` waits that long for a holder
that stopped renewing instead of failing at once. A lease left by a process that is provably gone (same
host and pid namespace: a dead pid, or this very process after the holder was dropped) is taken at once.

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
from dataclasses import dataclass
from typing import Any

from stages.common.errors import Transient
from stages.io import storage_remote as R

LEASE = ".vd-lease.json"
CLOCK = ".vd-clock"  # rewritten to read the store's clock
LEASE_S = 120.0
HOST = socket.gethostname()
_HELD: set[str] = set()  # tokens of the leases this process holds now


class LeaseHeld(Transient):
    """Another writer holds (or took over) the workspace's lease: transient, retry later."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _pid_namespace() -> str:
    """This process's pid namespace (containers on one host share a host name, not their pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass
class Seen:
    """The lease as read: its record (None: absent, {}: torn), ETag (S3) and heartbeat time (store clock)."""

    record: dict[str, Any] | None
    etag: str | None
    modified: float | None
    age: float | None = None  # store-clock seconds since the heartbeat, once a taker has asked

    def beat(self) -> tuple[Any, ...]:
        rec = self.record or {}
        return rec.get("token"), rec.get("beat"), self.modified, self.etag


class Lease:
    """The lease on `path` (a remote object) for writer `owner`; `target` names the workspace in messages."""

    def __init__(self, fs: Any, path: str, target: str, ttl: float = LEASE_S, owner: str | None = None):
        self.fs, self.path, self.target, self.ttl = fs, path, target, float(ttl)
        self.clock = f"{path.rsplit('/', 1)[0]}/{CLOCK}"
        self.token = uuid.uuid4().hex
        self.owner = owner or f"{HOST}:{os.getpid()}:{self.token[:8]}"
        self.held = False
        self.lost: str | None = None
        self.beats = 0
        self._mutex = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file_lock: Any = None

    # ------------------------------------------------------------------ reading
    def _read(self) -> Seen:
        """The lease object now; a torn record reads as {} (no valid holder)."""
        if R.backend(self.fs) == "local":  # record and mtime of one and the same file
            try:
                with open(self.fs._strip_protocol(self.path), "rb") as fh:
                    mtime, data = os.fstat(fh.fileno()).st_mtime, fh.read()
            except FileNotFoundError:
                return Seen(None, None, None)
            try:
                return Seen(R.parse_json(data, self.path), None, mtime)
            except R.Torn:
                return Seen({}, None, mtime)
        meta = R.info(self.fs, self.path)
        if meta is None:
            return Seen(None, None, None)
        try:
            rec = R.read_json(self.fs, self.path)
        except R.Torn:
            rec = {}
        # S3 compares ETags on write (If-Match), so a record newer than `meta` cannot be overwritten by mistake
        return Seen(rec, meta.get("ETag") if R.backend(self.fs) == "s3" else None, R.modified(meta))

    def _free(self, seen: Seen) -> bool:
        """May this writer take a lease seen as `seen`? Asks the store's clock only when it must."""
        rec = seen.record
        if not rec or rec.get("token") == self.token:
            return True
        try:
            pid, ttl = int(rec["pid"]), float(rec.get("ttl", LEASE_S))
        except (KeyError, TypeError, ValueError):
            return True  # not a lease anyone could hold
        if rec.get("host") == HOST and rec.get("pidns", _pid_namespace()) == _pid_namespace():  # same machine: is it there?
            if (pid == os.getpid() and rec.get("token") not in _HELD) or (pid != os.getpid() and not _alive(pid)):
                return True
        if seen.modified is None:
            return False  # a store that cannot time its objects: only the holder gives it back
        seen.age = R.storage_now(self.fs, self.clock) - seen.modified
        return seen.age > ttl + R.resolution(self.fs)  # no heartbeat for the holder's TTL: dead

    def _describe(self, seen: Seen | None) -> str:
        rec = (seen.record if seen else None) or {}
        text = str(rec.get("owner", "?"))
        if seen is not None and seen.age is not None:
            text += f", last heartbeat {max(0.0, seen.age):.0f} s ago (taken over after {rec.get('ttl', LEASE_S):g} s " \
                    "without one)"
        return text

    def _record(self) -> dict[str, Any]:
        self.beats += 1
        return {"owner": self.owner, "token": self.token, "host": HOST, "pid": os.getpid(),
                "pidns": _pid_namespace(), "ttl": self.ttl, "beat": self.beats}

    # ------------------------------------------------------------------ writing
    def _take(self) -> Seen | None:
        """Write our record if the lease is free; returns the blocking lease otherwise."""
        for _ in range(3):
            seen = self._read()
            if not self._free(seen):
                return seen
            if R.write_json(self.fs, self.path, self._record(), create=seen.record is None, if_match=seen.etag):
                return None
        return self._read()  # lost three races in a row: someone is busy taking it

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

    def _wait_out(self, blocker: Seen) -> Seen | None:
        """Wait while the holder sends no heartbeat, up to its TTL on the store's clock; None once the lease
        is ours, else the holder's lease (it renewed, or it outlived the wait)."""
        ttl = float((blocker.record or {}).get("ttl", LEASE_S) or LEASE_S)
        left = ttl - (blocker.age or 0.0) + R.resolution(self.fs)
        end = time.monotonic() + max(left, 0.0) + 2 * R.resolution(self.fs) + 1.0
        first = blocker.beat()
        while time.monotonic() < end:
            time.sleep(min(max(ttl / 6, 0.2), 5.0, max(end - time.monotonic(), 0.05)))
            blocker = self._locked(self._take)
            if blocker is None or blocker.beat() != first:
                return blocker  # ours now, or a heartbeat: the holder is alive (or a new writer won)
        return blocker

    def acquire(self, wait: bool = False) -> None:
        """Take the lease (or confirm it is still ours); LeaseHeld when another writer has it. `wait`: wait
        (at most the holder's TTL) for a holder that sends no heartbeat, then take its lease over."""
        with self._mutex:
            if self.lost:
                raise LeaseHeld(self.lost)
            if self.held:
                return
            blocker = self._locked(self._take)
            rec = blocker.record if blocker else None
            if rec and rec.get("host") == HOST and rec.get("pid") == os.getpid():
                # held by a writer of this process: one that was dropped (a failed clip) may only wait
                # for the garbage collector, whose finalizer gives the lease back
                gc.collect()
                blocker = self._locked(self._take)
            if blocker is not None and wait:
                blocker = self._wait_out(blocker)
            if blocker is None:
                mine = self._read()  # stores without conditional writes: the last writer wins
                if not mine.record or mine.record.get("token") != self.token:
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
        """Send a heartbeat (rewrite the lease); False (and `lost` set) when another writer took it over."""
        def step() -> bool:
            seen = self._read()
            if not seen.record or seen.record.get("token") != self.token:
                self._lose(seen)
                return False
            if not R.write_json(self.fs, self.path, self._record(), if_match=seen.etag):
                self._lose(self._read())
                return False
            return True

        with self._mutex:
            return self.held and self._locked(step)

    def _lose(self, seen: Seen | None) -> None:
        self.held = False
        _HELD.discard(self.token)
        self._stop.set()
        self.lost = (f"lost the write lease on {self.target} to another writer ({self._describe(seen)}); "
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
        """Give the lease back (best effort: an unreachable store lets it lapse instead)."""
        self._stop.set()
        with self._mutex:
            was = self.held
            self.held = False
            _HELD.discard(self.token)
            if not was:
                return

            def drop() -> None:
                seen = self._read()
                if seen.record and seen.record.get("token") == self.token:
                    R.remove(self.fs, self.path)

            try:
                self._locked(drop)
            except Exception:
                pass
