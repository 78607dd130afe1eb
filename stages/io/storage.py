"""Where a batch clip's workspace lives: a local folder (used in place) or any fsspec URL (s3://, gs://,
az://, file://), in which case the stages run in a local scratch copy that is synced to the URL after
each completed stage (the unit of resume).

The remote copy carries a marker `.vd-sync.json`: {"state": "clean" | "writing", "stage", "generation",
"files": {relative path: size}}. A push writes "writing" first, uploads the changed files (array chunks
before zarr.json metadata), deletes files that are gone locally, then writes "clean" with a new
generation. A pull trusts only what the marker lists and, after an interrupted push, drops the stage
that was being written (and the stages after it), so half-synced arrays are never used. Credentials and
endpoints come from the environment / standard config of the filesystem (e.g. AWS_* variables,
FSSPEC_S3_ENDPOINT_URL) only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any


def is_url(text: str) -> bool:
    """True for fsspec URLs such as s3://bucket/key or file:///path (not for plain paths)."""
    return "://" in str(text)


MARKER = ".vd-sync.json"
SKIP_PARTS = {".locks", ".tmp"}
SKIP_FILES = {".vd.lock", MARKER}
# the workspace parts each stage writes, and what a redone stage makes stale
STAGE_PARTS = {"mask": ("zarr.json", "video", "masks"), "invert": ("inversion",), "edit": ("edits",),
               "eval": ("eval",)}
ORDER = ("mask", "invert", "edit", "eval")


def default_scratch() -> Path:
    """Local scratch root for remote workspaces (per user, in the temp folder)."""
    import getpass

    return Path(tempfile.gettempdir()) / f"vd-batch-{getpass.getuser()}"


def workspace_target(out: str, name: str) -> str:
    """The workspace location of clip `name` under --out (a folder or a URL)."""
    return f"{out.rstrip('/')}/{name}.vd" if is_url(out) else str(Path(out) / f"{name}.vd")


def _filesystem(url: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def _parts_from(stage: str) -> set[str]:
    """Workspace parts written by `stage` and the stages after it (stale when `stage` is redone)."""
    start = ORDER.index(stage) if stage in ORDER else 0
    return {part for later in ORDER[start:] for part in STAGE_PARTS[later]}


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


class Storage:
    """A clip's workspace: `local` is where the stages run; pull/push sync it with a remote URL."""

    def __init__(self, target: str, scratch: str | Path | None = None):
        self.target = target
        self.remote = is_url(target)
        if not self.remote:
            self.local = Path(target)
            return
        self.fs, self.root = _filesystem(target)
        key = uuid.uuid5(uuid.NAMESPACE_URL, target).hex[:12]
        base = Path(scratch) if scratch else default_scratch()
        self.local = base / key / Path(self.root).name
        self.state_file = base / key / "sync-state.json"

    # ------------------------------------------------------------------ remote side
    def _remote(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def _marker(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._remote(MARKER), "rb") as fh:
                return json.loads(fh.read().decode())
        except FileNotFoundError:
            return None

    def _parent(self, rel: str) -> None:
        """Folders exist only on folder-based filesystems (file://); object stores need none."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        if "file" in protocols or "local" in protocols:
            self.fs.makedirs(self._remote(rel).rsplit("/", 1)[0], exist_ok=True)

    def _write_marker(self, marker: dict[str, Any]) -> None:
        self._parent(MARKER)
        with self.fs.open(self._remote(MARKER), "wb") as fh:
            fh.write(json.dumps(marker).encode())

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, generation: str | None) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"generation": generation, "files": _listing(self.local)}))

    # ------------------------------------------------------------------ sync
    def pull(self) -> bool:
        """Bring the remote workspace into scratch (unless scratch already has its generation); True when
        the remote had one."""
        if not self.remote:
            return self.local.is_dir()
        self.fs.invalidate_cache()  # another node may have written since this process last listed
        marker = self._marker()
        if marker is None:
            return False
        state = self._state()
        if marker.get("state") == "clean" and state.get("generation") == marker.get("generation") \
                and self.local.is_dir():
            return True
        if self.local.exists():
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True)
        writing = marker.get("state") == "writing"
        dropped = _parts_from(marker.get("stage", "mask")) if writing else ()
        for rel in marker.get("files", {}):
            if rel.split("/")[0] in dropped or (writing and "zarr.json" in dropped):
                continue
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._remote(rel), str(dest))
        self._save_state(None if writing else marker.get("generation"))
        return True

    def push(self, stage: str) -> int:
        """Upload what changed since the last sync (after `stage` completed); returns the files uploaded."""
        if not self.remote:
            return 0
        self.fs.invalidate_cache()
        old = self._state()
        before = old.get("files", {})
        now = _listing(self.local)
        marker = self._marker()
        if marker is not None and marker.get("state") == "clean" and marker.get("generation") == old.get("generation") \
                and all(before.get(rel) == meta for rel, meta in now.items()) and set(before) == set(now):
            return 0
        prefix = self.root.rstrip("/") + "/"
        there = {p[len(prefix):] for p in self.fs.find(self.root) if p.startswith(prefix)} - {MARKER}
        changed = [rel for rel, meta in now.items() if before.get(rel) != meta or rel not in there]
        gone = sorted(there - set(now))
        previous = (marker or {}).get("files", {})
        self._write_marker({"state": "writing", "stage": stage, "generation": None, "files": previous})
        # chunks first, metadata last: a reader without the marker sees old metadata rather than new
        # metadata pointing at chunks not uploaded yet
        for rel in sorted(changed, key=lambda r: (r.endswith("zarr.json"), -r.count("/"))):
            self._parent(rel)
            self.fs.put_file(str(self.local / rel), self._remote(rel))
        for rel in gone:
            try:
                self.fs.rm_file(self._remote(rel))
            except FileNotFoundError:
                pass
        generation = uuid.uuid4().hex
        self._write_marker({"state": "clean", "stage": stage, "generation": generation,
                            "files": {rel: meta[0] for rel, meta in now.items()}})
        self._save_state(generation)
        return len(changed)

    def cleanup(self) -> None:
        """Remove the scratch copy of a remote workspace (its contents are on the remote)."""
        if self.remote:
            shutil.rmtree(self.state_file.parent, ignore_errors=True)


def fetch_clip(clip: str, scratch: str | Path | None = None) -> str:
    """A local path for `clip`: the path itself, or a cached download of a URL."""
    if not is_url(clip):
        return clip
    from stages.common.errors import InputError

    fs, path = _filesystem(clip)
    base = Path(scratch) if scratch else default_scratch()
    dest = base / "clips" / uuid.uuid5(uuid.NAMESPACE_URL, clip).hex[:12] / Path(path).name
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise InputError(f"clip {clip} not found") from None
    if not (dest.is_file() and dest.stat().st_size == size):
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        fs.get_file(path, str(part))
        part.replace(dest)
    return str(dest)
