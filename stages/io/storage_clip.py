"""Clips given as URLs (file://, s3://, ...): downloaded into the scratch folder, identified by content.

A URL clip's identity is the store's version of it (ETag, version id or generation, size, modification
time; on file:// also inode and ctime, which no user can set back) plus the sha256 of the downloaded bytes.
A cached copy is used only while the store reports the very same version AND the copy's own sha256 still
matches what was downloaded (so neither a replaced remote nor a damaged cache passes); anything else is
downloaded again. A store that reports nothing but a size is downloaded again every time.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.digest import file_sha256  # streamed; its cache is keyed by ctime, which no user sets back
from stages.common.errors import InputError, Transient
from stages.io import storage_remote as R

# fsspec info keys that change when an object is replaced, by the name kept in the identity
VERSION_KEYS = {"ETag": "etag", "etag": "etag", "VersionId": "version", "version_id": "version",
                "generation": "generation", "md5Hash": "md5", "LastModified": "modified",
                "last_modified": "modified", "updated": "modified"}
META = "clip.json"


@dataclass(frozen=True)
class ClipCopy:
    """A local file for a clip: `path`, and for a URL the sha256 of its bytes and the store's version."""

    path: str
    sha256: str | None = None
    remote: dict[str, Any] = field(default_factory=dict)


def remote_version(fs: Any, path: str, clip: str) -> dict[str, Any]:
    """What the store says identifies the object at `path` now; InputError when it is absent."""
    meta = R.info(fs, path)
    if meta is None or meta.get("type") == "directory":
        raise InputError(f"clip {clip} not found (a URL clip must name one file)")
    if R.backend(fs) == "local":
        st = os.stat(fs._strip_protocol(path))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
    out: dict[str, Any] = {"size": int(meta.get("size") or 0)}
    for key, name in VERSION_KEYS.items():
        if meta.get(key) not in (None, ""):
            out[name] = str(meta[key])
    return out


def _cached(dest: Path, meta_file: Path, remote: dict[str, Any]) -> str | None:
    """The cached copy's sha256 when it is still the store's version and intact, else None."""
    if len(remote) < 2:  # a size alone cannot tell a replaced object
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("remote") != remote or dest.stat().st_size != remote["size"]:
            return None
        digest = file_sha256(dest)
    except (OSError, ValueError, AttributeError):
        return None
    return digest if digest == meta.get("sha256") else None


def fetch_clip_info(clip: str, scratch: str | Path | None = None) -> ClipCopy:
    """A local copy of `clip` (a plain path is returned as it is, without hashing)."""
    if not R.is_url(clip):
        return ClipCopy(clip)
    from filelock import FileLock

    fs, path = R.filesystem(clip)
    base = Path(scratch) if scratch else R.default_scratch()
    folder = base / "clips" / uuid.uuid5(uuid.NAMESPACE_URL, clip).hex[:12]
    dest, meta_file = folder / Path(path).name, folder / META
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock"), timeout=600):  # one download per clip at a time on this node
        for _ in range(3):
            remote = remote_version(fs, path, clip)
            digest = _cached(dest, meta_file, remote)
            if digest is not None:
                return ClipCopy(str(dest), digest, remote)
            part = folder / f"{dest.name}.{uuid.uuid4().hex[:8]}.part"
            try:
                try:
                    fs.get_file(path, str(part))
                except FileNotFoundError:
                    raise InputError(f"clip {clip} not found") from None
                digest = file_sha256(part)
                if remote_version(fs, path, clip) != remote or part.stat().st_size != remote["size"]:
                    continue  # replaced while it was downloaded: fetch the new one
                os.replace(part, dest)
                tmp = meta_file.with_name(f"{META}.{uuid.uuid4().hex[:8]}.tmp")
                tmp.write_text(json.dumps({"url": clip, "remote": remote, "sha256": digest}))
                os.replace(tmp, meta_file)
                return ClipCopy(str(dest), digest, remote)
            finally:
                part.unlink(missing_ok=True)
    raise Transient(f"clip {clip} kept changing while it was downloaded; try again")


def fetch_clip(clip: str, scratch: str | Path | None = None) -> str:
    """A local path for `clip`: the path itself, or a checked download of a URL (see fetch_clip_info)."""
    return fetch_clip_info(clip, scratch).path
