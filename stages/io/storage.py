"""Where a batch clip's workspace lives: a local folder (used in place) or any fsspec URL (s3://, gs://,
az://, file://), in which case the stages run in a local scratch copy that is synced to the URL after
each completed stage (the unit of resume).

Remote layout: every push uploads the files changed since the last sync as a new generation under
`gens/<generation>/`, then writes the pointer `.vd-sync.json` LAST: {"version": 2, "generation", "stage",
"seq", "files": {relative path: [size, generation holding it]}}. A reader resolves the pointer, so it
sees a whole stage or the previous one, never half of one. The previous pointer is kept as
`.vd-sync.prev.json` (a torn pointer falls back to it) and files neither pointer names are deleted
after the pointer moves. A push that fails leaves the pointer (and the local copy) as they were: the
retry pulls nothing and pushes again. One writer at a time holds the lease `.vd-lease.json` (see
storage_lease). Credentials and endpoints come from the environment / standard config of the
filesystem (e.g. AWS_* variables, AWS_ENDPOINT_URL) only.

The scratch copy is not trusted blindly (a temp-folder cleaner may thin it out after a crash): a pull keeps
it only when every file of the listing saved at the last sync is still there (with its size, unless the
stage rewrote it since), else it downloads the remote generation again. A push publishes the deletion of a
file the previous generation had only when the stage that ran could have deleted it (its own workspace
parts and those of later stages); any other missing file means a damaged copy: nothing is pushed, the
copy is pulled again on the retry (ScratchDamaged, transient).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from stages.common.errors import InputError, Transient
from stages.io import storage_remote as R
from stages.io.storage_clip import ClipCopy, fetch_clip, fetch_clip_info
from stages.io.storage_lease import LEASE, LEASE_S, Lease, LeaseHeld
from stages.io.storage_remote import default_scratch, is_url

__all__ = ["MARKER", "PREVIOUS", "LEASE", "Storage", "LeaseHeld", "ScratchDamaged", "ClipCopy", "is_url",
           "default_scratch", "workspace_target", "fetch_clip", "fetch_clip_info", "copy_out"]

log = logging.getLogger("vd.storage")


class ScratchDamaged(Transient):
    """Files of the scratch copy vanished that no stage deleted: nothing pushed, pull again."""


MARKER = ".vd-sync.json"  # the sync pointer
PREVIOUS = ".vd-sync.prev.json"
GENS = "gens"
SKIP_PARTS = {".locks", ".tmp"}
SKIP_FILES = {".vd.lock", MARKER}
# the workspace parts each stage writes, and what a redone stage makes stale
STAGE_PARTS = {"mask": ("zarr.json", "video", "masks"), "invert": ("inversion",), "edit": ("edits",),
               "eval": ("eval",)}
ORDER = ("mask", "invert", "edit", "eval")
KNOWN_PARTS = {part for parts in STAGE_PARTS.values() for part in parts}


def workspace_target(out: str, name: str) -> str:
    """The workspace location of clip `name` under --out (a folder or a URL)."""
    return f"{out.rstrip('/')}/{name}.vd" if is_url(out) else str(Path(out) / f"{name}.vd")


def _parts_from(stage: str) -> set[str]:
    """Workspace parts written by `stage` and the stages after it (stale when `stage` is redone)."""
    start = ORDER.index(stage) if stage in ORDER else 0
    return {part for later in ORDER[start:] for part in STAGE_PARTS[later]}


def _deletable(rel: str, stage: str, ran: bool) -> bool:
    """Could `stage` have deleted the workspace file `rel`? Only when it ran, and only in its own parts or
    those of later stages (which a redone stage makes stale); files of no stage's part go with any."""
    part = rel.split("/")[0]
    return ran and (part not in KNOWN_PARTS or part in _parts_from(stage))


def _missing(root: Path, listing: dict[str, Any]) -> list[str]:
    """Files of a sync-time `listing` ({rel: [size, mtime_ns]}) that are gone from `root`, or changed size
    without being rewritten (same mtime)."""
    out = []
    for rel, meta in listing.items():
        try:
            stat = (root / rel).stat()
        except OSError:
            out.append(rel)
            continue
        try:
            size, mtime = int(meta[0]), int(meta[1])
        except (TypeError, ValueError, IndexError):
            out.append(rel)  # a listing we cannot read proves nothing: pull again
            continue
        if stat.st_size != size and stat.st_mtime_ns == mtime:
            out.append(rel)
    return sorted(out)


def _listing(root: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of the workspace's files (locks and scratch excluded)."""
    out: dict[str, list[int]] = {}
    if not root.is_dir():
        return out
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_dir() or rel.parts[0] in SKIP_PARTS or rel.name in SKIP_FILES or rel.suffix == ".lock":
            continue
        stat = path.stat()
        out[rel.as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return out


def _safe(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def _resolve(raw: dict[str, Any]) -> dict[str, Any]:
    """A pointer as {"generation", "seq", "stage", "files": {rel: [size, gen]}, "raw"}; also reads the
    version-1 marker (files at the root, "writing" = the named stage and later are not trusted)."""
    try:
        if raw.get("version") == 2:
            files = {str(rel): [int(v[0]), str(v[1])] for rel, v in raw["files"].items()}
            out = {"generation": str(raw["generation"]), "seq": int(raw.get("seq", 0)), "stage": raw.get("stage")}
        else:
            writing = raw.get("state") != "clean"
            dropped = _parts_from(raw.get("stage", "mask")) if writing else set()
            files = {str(rel): [int(size), ""] for rel, size in raw["files"].items()
                     if not (rel.split("/")[0] in dropped or "zarr.json" in dropped)}
            out = {"generation": None if writing else raw.get("generation"), "seq": 0, "stage": raw.get("stage")}
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise R.Torn(MARKER) from None
    if not all(_safe(rel) and (gen == "" or _safe(gen)) for rel, (_, gen) in files.items()):
        raise R.Torn(MARKER)
    return {**out, "files": files, "raw": raw}


class Storage:
    """A clip's workspace: `local` is where the stages run; pull/push sync it with a remote URL.

    A writer holds the remote workspace's lease from its first pull (or push) until release() / cleanup()
    (or until the object is dropped); use `with Storage(...) as s:` to give it back on every path."""

    def __init__(self, target: str, scratch: str | Path | None = None, owner: str | None = None,
                 lease_s: float = LEASE_S, wait_dead: bool = False):
        self.target = target
        self.remote = is_url(target)
        self.lease: Lease | None = None
        self.wait_dead = wait_dead  # pull: wait (up to its TTL) for a lease holder that stopped renewing
        if not self.remote:
            self.local = Path(target)
            return
        self.fs, self.root = R.filesystem(target)
        self.root = self.root.rstrip("/")
        key = uuid.uuid5(uuid.NAMESPACE_URL, target).hex[:12]
        base = Path(scratch) if scratch else default_scratch()
        self.local = base / key / Path(self.root).name
        self.state_file = base / key / "sync-state.json"
        self.lease = Lease(self.fs, self._remote(LEASE), target, lease_s, owner)
        weakref.finalize(self, self.lease.release)  # a dropped writer (a failed clip) frees its lease

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ remote side
    def _remote(self, rel: str, gen: str = "") -> str:
        return f"{self.root}/{GENS}/{gen}/{rel}" if gen else f"{self.root}/{rel}"

    def _pointer(self) -> dict[str, Any] | None:
        """The resolved sync pointer, None when the remote has none; a torn one falls back to the previous
        pointer, else InputError."""
        try:
            raw = R.read_json(self.fs, self._remote(MARKER))
            return None if raw is None else _resolve(raw)
        except R.Torn:
            pass
        try:
            prev = R.read_json(self.fs, self._remote(PREVIOUS))
            if prev is not None:
                log.warning("%s: unreadable %s, using the previous one (%s)", self.target, MARKER, PREVIOUS)
                return _resolve(prev)
        except R.Torn:
            pass
        raise InputError(f"remote workspace {self.target}: {MARKER} is unreadable (a torn write?) and there is "
                         f"no previous pointer; delete {self.target.rstrip('/')}/{MARKER} to start this clip over")

    # ------------------------------------------------------------------ local sync state
    def _state(self) -> dict[str, Any]:
        try:
            value = json.loads(self.state_file.read_text())
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict[str, Any]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f"{self.state_file.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)

    def _synced_state(self, pointer: dict[str, Any] | None) -> dict[str, Any]:
        """The local sync state, adopting a push whose pointer landed though the push did not finish."""
        state = self._state()
        pending = state.get("pending") or {}
        if pointer is not None and pending.get("generation") and pending["generation"] == pointer["generation"]:
            state = {"generation": pending["generation"], "files": pending.get("files", {})}
            self._save_state(state)
        return state

    # ------------------------------------------------------------------ sync
    def pull(self, lease: bool = True) -> bool:
        """Make the scratch copy the remote workspace (kept as it is when it already stands on the remote's
        generation, unpushed work included); True when the remote had one. `lease`: take the write lease
        first (writers); readers pass False."""
        if not self.remote:
            return self.local.is_dir()
        if lease and self.lease is not None:
            self.lease.acquire(wait=self.wait_dead)
        for _ in range(3):
            self.fs.invalidate_cache()  # another node may have written since this process last listed
            pointer = self._pointer()
            if pointer is None:
                return False
            state = self._synced_state(pointer)
            if pointer["generation"] is not None and state.get("generation") == pointer["generation"] \
                    and self.local.is_dir():
                missing = _missing(self.local, state.get("files") or {})
                if not missing:
                    return True
                log.warning("%s: the scratch copy lost %d file(s) (%s%s); downloading it again", self.target,
                            len(missing), missing[0], ", ..." if len(missing) > 1 else "")
            try:
                self._download(pointer, self.local)
            except FileNotFoundError as exc:
                again = self._pointer()
                if again is not None and again["generation"] == pointer["generation"]:
                    raise InputError(f"remote workspace {self.target} lacks a file its pointer lists "
                                     f"({exc.filename or exc}); delete {MARKER} to start this clip over") from None
                continue  # a writer moved on and collected the old files: read the new generation
            self._save_state({"generation": pointer["generation"], "files": _listing(self.local)})
            return True
        raise InputError(f"remote workspace {self.target} kept changing while it was read; try again")

    def _download(self, pointer: dict[str, Any], dest: Path) -> None:
        if dest == self.local:
            self._save_state({})  # the local copy is being replaced
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        files = pointer["files"]
        lpaths = [str(dest / rel) for rel in files]
        for parent in {os.path.dirname(p) for p in lpaths}:
            os.makedirs(parent, exist_ok=True)
        if files:  # one batched call: fsspec fetches concurrently on object stores
            self.fs.get([self._remote(rel, gen) for rel, (_, gen) in files.items()], lpaths)

    def push(self, stage: str, ran: bool = True) -> int:
        """Upload what changed since the last sync (after `stage` completed; `ran`: it ran rather than being
        skipped as current) as a new generation and move the pointer to it; returns the files uploaded. On
        failure the remote still shows the previous generation and the local copy is untouched, so calling
        push again (or pull, then push) resumes. ScratchDamaged when files vanished that the stage could
        not have deleted: nothing is pushed and the next pull downloads the remote copy again."""
        if not self.remote:
            return 0
        assert self.lease is not None
        self.lease.check()  # take the lease, or confirm (and extend) it before uploading anything
        self.fs.invalidate_cache()
        pointer = self._pointer()
        state = self._synced_state(pointer)
        if pointer is not None and pointer["generation"] != state.get("generation"):
            raise InputError(f"remote workspace {self.target} changed since this copy was pulled "
                             "(another writer?); run again to continue from the remote copy")
        there = pointer["files"] if pointer else {}
        before, now = state.get("files", {}), _listing(self.local)
        lost = sorted(rel for rel in there if rel not in now and not _deletable(rel, stage, ran))
        if lost:
            self._save_state({})  # the copy cannot be trusted: the next pull downloads the remote one
            raise ScratchDamaged(f"the scratch copy of {self.target} lost {len(lost)} file(s) the {stage} stage "
                                 f"did not delete ({lost[0]}{', ...' if len(lost) > 1 else ''}; a temp-folder "
                                 "cleaner?); nothing was pushed, the next attempt downloads the remote copy again")
        changed = sorted(rel for rel, meta in now.items() if rel not in there or before.get(rel) != meta)
        if not changed and set(now) == set(there):
            return 0
        seq = (pointer["seq"] if pointer else 0) + 1
        gen = f"{seq:05d}-{uuid.uuid4().hex[:10]}"
        self._save_state({**state, "pending": {"generation": gen, "files": now}})
        self._upload(gen, changed)
        fresh = set(changed)
        files = {rel: [meta[0], gen if rel in fresh else there[rel][1]] for rel, meta in now.items()}
        self.lease.check()  # a writer that lost its lease must not move the pointer
        if pointer is not None:
            R.write_json(self.fs, self._remote(PREVIOUS), pointer["raw"])
        R.write_json(self.fs, self._remote(MARKER), {
            "version": 2, "state": "clean", "stage": stage, "generation": gen, "seq": seq,
            "owner": self.lease.owner, "written": round(time.time(), 3), "files": files})
        self._save_state({"generation": gen, "files": now})
        self._collect([files, there])
        return len(changed)

    def _upload(self, gen: str, rels: list[str]) -> None:
        if not rels:
            return
        rpaths = [self._remote(rel, gen) for rel in rels]
        if R.backend(self.fs) == "local":  # object stores need no folders
            for parent in {p.rsplit("/", 1)[0] for p in rpaths}:
                self.fs.makedirs(parent, exist_ok=True)
        self.fs.put([str(self.local / rel) for rel in rels], rpaths)  # batched, concurrent on object stores

    def _collect(self, keep: list[dict[str, list[Any]]]) -> None:
        """Delete remote files neither the new nor the previous pointer names (best effort)."""
        try:
            wanted = {self._remote(rel, gen) for files in keep for rel, (_, gen) in files.items()}
            live = {gen for files in keep for _, gen in files.values()}
            prefix = self.root + "/"
            whole, single = set(), []
            for path in self.fs.find(self.root):
                rel = path[len(prefix):] if path.startswith(prefix) else None
                if rel is None or path in wanted or rel.startswith(".vd-"):
                    continue
                parts = rel.split("/")
                if parts[0] == GENS and len(parts) > 2 and parts[1] not in live:
                    whole.add(f"{self.root}/{GENS}/{parts[1]}")
                else:
                    single.append(path)
            if whole:
                self.fs.rm(sorted(whole), recursive=True)
            if single:
                self.fs.rm(single)
        except Exception as exc:  # garbage only costs space; the next push tries again
            log.debug("%s: collecting old generations failed: %s", self.target, exc)

    # ------------------------------------------------------------------ end
    def release(self) -> None:
        """Give the write lease back (pushed work stays; unpushed local work stays in scratch)."""
        if self.lease is not None:
            self.lease.release()

    def cleanup(self) -> None:
        """Give the lease back and remove the scratch copy of a remote workspace (it is on the remote)."""
        if self.remote:
            self.release()
            shutil.rmtree(self.state_file.parent, ignore_errors=True)


def copy_out(url: str, dest: str | Path) -> Path:
    """Download the remote workspace at `url` (its current generation) into the new folder `dest`."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InputError(f"{dest} exists and is not empty; choose another destination")
    storage = Storage(url, scratch=tempfile.gettempdir())
    pointer = storage._pointer()
    if pointer is None:
        raise InputError(f"no vd workspace at {url}")
    storage._download(pointer, dest)
    return dest


if __name__ == "__main__":  # python -m stages.io.storage s3://bucket/runs/a.vd a.vd
    import sys

    from stages.common.errors import VdError

    if len(sys.argv) != 3:
        sys.exit("usage: python -m stages.io.storage URL DEST")
    try:
        print(copy_out(sys.argv[1], sys.argv[2]))
    except VdError as exc:
        print(f"vd: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
