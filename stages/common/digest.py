"""Short, stable content digests of arrays and JSON-able values (settings, masks, frames), and the full
sha256 of files.

File identity rule (`file_sha256`): a file is identified by the sha256 of its bytes, read in full. A digest
may be reused from the cache <$XDG_CACHE_HOME or ~/.cache>/vd/file-sha256/<key> only while the key
dev-inode-size-mtime_ns-ctime_ns is unchanged. Users can set mtime back (os.utime, touch -d, cp -p) but not
ctime, which the kernel sets to "now" on every write, replacement, chmod or rename; so content replaced with
the old size and mtime restored has a new key and is read again. A digest is cached only when the file
stayed the same while it was read and was last changed at least RACY_NS ago (a change within the same
timestamp tick could keep the ctime), and only for files of CACHE_MIN_BYTES or more (re-reading a small
file costs less than trusting a cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.cache import vd_cache
from stages.common.errors import InputError

HASH_CACHE = "file-sha256"
CACHE_MIN_BYTES = 16 << 20
RACY_NS = 2_000_000_000
_BLOCK = 8 << 20


def digest(*parts: Any, length: int = 16) -> str:
    """sha256 over the parts (arrays by their bytes, other values as sorted JSON), first `length` hex digits."""
    h = hashlib.sha256()
    for part in parts:
        h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray)
                 else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:length]


def stat_key(st: os.stat_result) -> str:
    """The cache key of a file's state: device, inode, size, mtime and ctime (the one a user cannot set)."""
    return f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}"


def _read_cached(entry: Path) -> str | None:
    try:
        value = entry.read_text().strip()
    except OSError:
        return None
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def _write_cached(entry: Path, value: str) -> None:
    try:  # the cache only saves time: a read-only or full cache folder is not an error
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(value)
        os.replace(tmp, entry)
    except OSError:
        pass


def file_sha256(path: str | Path) -> str:
    """Full sha256 of a file's bytes, streamed; reused from the ctime-keyed cache (see the module docstring).
    A symlink is followed. InputError with one line when the file cannot be read."""
    path = Path(path)
    try:
        real = path.resolve()
        before = real.stat()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    key = stat_key(before)
    cacheable = before.st_size >= CACHE_MIN_BYTES
    entry = vd_cache(HASH_CACHE) / key
    if cacheable and (cached := _read_cached(entry)):
        return cached
    h = hashlib.sha256()
    try:
        with open(real, "rb") as fh:
            for block in iter(lambda: fh.read(_BLOCK), b""):
                h.update(block)
        after = real.stat()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    value = h.hexdigest()
    settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) >= RACY_NS
    if cacheable and settled and stat_key(after) == key:
        _write_cached(entry, value)
    return value
