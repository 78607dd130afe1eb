"""Faults caused for real on files (shared by the clip and model identity tests): content replaced in place
with the size and mtime set back, and a digest cache that stores every file at once. Test modules import the
fixtures `cache` (autouse: the vd cache under tmp_path) and `cache_everything`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """(autouse where imported) The vd cache under `tmp_path`; returns the file-digest cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "vd" / "file-sha256"


@pytest.fixture
def cache_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache every file at once (a real run caches only files of 16 MiB or more that settled 2 s ago)."""
    from stages.common import digest as dg

    monkeypatch.setattr(dg, "CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(dg, "RACY_NS", 0)


def replace_keeping_stat(path: Path, data: bytes) -> None:
    """Write other bytes of the same size into `path` in place and set its atime/mtime back, as a user can.
    Waits (chmod sets the ctime to now) until the kernel's ctime tick has moved on, so the test never depends
    on how coarse the clock is."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    while path.stat().st_ctime_ns == st.st_ctime_ns:
        os.chmod(path, st.st_mode)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
