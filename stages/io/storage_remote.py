"""Small JSON objects next to a remote workspace (sync pointer, lease), written whole or not at all, and
the store's own clock (`storage_now`, `modified`): times that are compared across machines always come
from the store, never from a writer's wall clock.

On a folder filesystem (file://) an object is written to a temporary name and renamed into place, so a
reader sees the old or the new content, never a torn one. On S3 a PUT is already all-or-nothing, and
S3's conditional writes (If-None-Match / If-Match) make "create if absent" and "replace if unchanged"
atomic. Other stores (gs://, az://) get plain writes (callers read back to confirm).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MTIME_KEYS = ("LastModified", "mtime", "last_modified", "updated")  # s3 / file / azure / gcs


def is_url(text: str) -> bool:
    """True for fsspec URLs such as s3://bucket/key or file:///path (not for plain paths)."""
    return "://" in str(text)


def default_scratch() -> Path:
    """Local scratch root for remote workspaces and clips (per user, in the temp folder)."""
    import getpass

    return Path(tempfile.gettempdir()) / f"vd-batch-{getpass.getuser()}"


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) of `url`; endpoints and credentials are read from the environment each time
    (no cached instance)."""
    from fsspec.core import url_to_fs

    return url_to_fs(url, skip_instance_cache=True)


class Torn(ValueError):
    """A JSON object exists but cannot be parsed (a torn or foreign write)."""


def backend(fs: Any) -> str:
    """'local' (folders: file://), 's3', or 'other'."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return "local"
    return "s3" if "s3" in protocols or "s3a" in protocols else "other"


def read_json(fs: Any, path: str) -> dict[str, Any] | None:
    """The object at `path` as a dict, None when absent; Torn when it is not a JSON object."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return parse_json(data, path)


def parse_json(data: bytes, path: str = "") -> dict[str, Any]:
    """`data` as a JSON object; Torn when it is not one."""
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        raise Torn(path) from None
    if not isinstance(value, dict):
        raise Torn(path)
    return value


def info(fs: Any, path: str) -> dict[str, Any] | None:
    """The store's fresh metadata of `path` (no cached listing), None when absent."""
    fs.invalidate_cache(path)
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None


def _seconds(value: Any) -> float | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return _seconds(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def modified(meta: dict[str, Any] | None) -> float | None:
    """When the store last wrote an object (POSIX seconds on the STORE's clock), from its `info`."""
    for key in MTIME_KEYS:
        got = _seconds((meta or {}).get(key))
        if got is not None:
            return got
    return None


def resolution(fs: Any) -> float:
    """How coarse the store's modification times are (S3 reports whole seconds)."""
    return 0.0 if backend(fs) == "local" else 1.0


def storage_now(fs: Any, path: str) -> float:
    """The store's clock now: (re)write the empty object `path` and read back when the store wrote it."""
    if backend(fs) == "local":
        local = fs._strip_protocol(path)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "ab"):
            pass
        os.utime(local, None)  # the file system's clock (an NFS server's, on NFS)
        return os.stat(local).st_mtime
    fs.pipe_file(path, b"")
    got = modified(info(fs, path))
    if got is None:
        raise OSError(f"{path}: the store reports no modification time, so leases cannot be timed")
    return got


def write_json(fs: Any, path: str, value: dict[str, Any], create: bool = False,
               if_match: str | None = None) -> bool:
    """Write `value` at `path` whole; False when a condition failed (`create`: the object already exists;
    `if_match`: its ETag changed, S3 only)."""
    data = json.dumps(value, separators=(",", ":")).encode()
    kind = backend(fs)
    if kind == "local":
        return _write_local(fs._strip_protocol(path), data, create)
    try:
        if kind == "s3" and create:
            fs.pipe_file(path, data, mode="create")
        elif kind == "s3" and if_match:
            fs.pipe_file(path, data, IfMatch=if_match)
        else:
            fs.pipe_file(path, data)
    except FileExistsError:
        return False
    except OSError as exc:  # s3fs reports a failed If-Match as EINVAL (HTTP 412)
        if if_match and exc.errno == errno.EINVAL:
            return False
        raise
    return True


def _write_local(path: str, data: bytes, create: bool) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        if create:
            try:
                os.link(tmp, path)  # fails when `path` exists: an atomic "create if absent"
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def remove(fs: Any, path: str) -> None:
    """Delete one object; absent is fine."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
