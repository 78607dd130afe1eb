"""The zarr workspace: one self-describing directory per clip that every stage reads and writes.

Layout (see README "Workspace layout"): video/frames, masks/{raw,edit}, inversion/..., edits/<name>/...,
eval/<name>. Root attributes hold the schema version and the source description. Whole arrays are
written atomically (built under .tmp/ and renamed into place); step-wise arrays are written chunk by
chunk with a `done` flag array written after the data, so an interrupted stage resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from filelock import FileLock

from stages import __version__
from stages.common.errors import InputError
from stages.common.errors import first_line
from stages.common.jsonsafe import json_safe

SCHEMA = "vd-workspace/1"
LOCK_DIR = ".locks"  # stages.io.locks's lock files (not part of the zarr hierarchy)
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def check_name(name: str) -> str:
    """Validate a slash-separated name inside the workspace (no escapes, no hidden parts)."""
    parts = name.rstrip("/").split("/")
    if not name or name.startswith("/") or any(not _NAME_PART.match(p) or p in (".", "..") for p in parts):
        raise InputError(f"invalid name {name!r}: use letters, digits, '_', '-', '.' (no '..' or '/')")
    return "/".join(parts)


class Workspace:
    """A vd workspace directory (a zarr v3 group on a local filesystem)."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    # ----------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str | Path, source: dict[str, Any], force: bool = False) -> "Workspace":
        """Create a workspace for `source`, or reuse one made from the same clip.

        A workspace made from another clip (different sha256) is refused unless `force`, which wipes it.
        A non-workspace, non-empty directory is always refused.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path} exists and is not a directory")
        if path.is_dir() and any(p.name != LOCK_DIR for p in path.iterdir()):
            if not (path / "zarr.json").is_file():
                raise InputError(f"{path} exists and is not a vd workspace; choose another -o")
            ws = cls.open(path)
            old = ws.attrs.get("source", {})
            same = old.get("sha256") == source.get("sha256") and all(
                old.get(k) == source.get(k) for k in ("frames", "size", "start", "stride", "fps_sample", "resize")
            )
            if not same and not force:
                raise InputError(
                    f"workspace {path} was created from another clip or frame selection "
                    f"({old.get('path', '?')}); pass --force to replace it"
                )
            if not same:  # wipe it, but keep .locks/: a running `vd mask` holds its lock there
                for child in path.iterdir():
                    if child.name != LOCK_DIR:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            else:
                ws.update_attrs(source=source)
                return ws
        path.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(path), mode="a")  # "w" would also delete .locks/
        group.attrs.update(
            {"schema": SCHEMA, "vd_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "source": source}
        )
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path) -> "Workspace":
        """Open an existing workspace or raise InputError with what is wrong."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"workspace {path} not found (create one with `vd mask CLIP`)")
        if not (path / "zarr.json").is_file():
            raise InputError(f"{path} is not a vd workspace (no zarr.json)")
        try:
            group = zarr.open_group(str(path), mode="r+")
        except Exception as exc:  # corrupt metadata
            raise InputError(f"{path} is not a readable zarr workspace: {exc}") from None
        schema = group.attrs.get("schema")
        if schema != SCHEMA:
            raise InputError(f"{path} has schema {schema!r}; this vd reads {SCHEMA!r}")
        return cls(path, group)

    # ----------------------------------------------------------------- attributes
    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (a fresh copy)."""
        return dict(zarr.open_group(str(self.path), mode="r").attrs.asdict())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Inter-process lock for read-modify-write of attributes."""
        with FileLock(str(self.path / ".vd.lock")):
            yield

    def update_attrs(self, name: str = "", **values: Any) -> None:
        """Merge `values` into the attributes of group `name` (root by default), under the lock."""
        with self.lock():
            group = self.require_group(name) if name else zarr.open_group(str(self.path), mode="r+")
            group.attrs.update(json_safe(values))

    def group_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of group `name`, or {} if it does not exist."""
        if not self.has(name):
            return {}
        return dict(zarr.open_group(str(self.path / check_name(name)), mode="r").attrs.asdict())

    def require_group(self, name: str) -> zarr.Group:
        """Create (or open) group `name` and its parents."""
        return zarr.open_group(str(self.path), mode="r+").require_group(check_name(name))

    # ----------------------------------------------------------------- arrays
    def has(self, name: str) -> bool:
        """Whether an array or group `name` exists."""
        return (self.path / check_name(name) / "zarr.json").is_file()

    def array(self, name: str) -> zarr.Array:
        """Open array `name` for reading and chunk-wise writing."""
        if not self.has(name):
            raise InputError(f"workspace {self.path} has no {name!r}")
        try:
            return zarr.open_array(str(self.path / check_name(name)), mode="r+")
        except Exception as exc:  # damaged metadata
            raise self.damaged(name, exc) from None

    def read(self, name: str) -> np.ndarray:
        """Read a whole array into memory; a damaged array raises InputError naming it and the fix."""
        arr = self.array(name)
        try:
            return arr[...]
        except Exception as exc:  # a chunk that does not decode (truncated, zstd error, wrong size)
            raise self.damaged(name, exc) from None

    def verify(self, name: str) -> tuple[int, ...]:
        """Decode every stored chunk of array `name` (block by block along axis 0); its shape, or
        InputError naming the array, the workspace and the fix. Used before a stage writes anything."""
        arr = self.array(name)
        step = max(int(arr.chunks[0]), 1) if arr.ndim else 1
        try:
            if arr.ndim == 0:
                arr[...]
            for start in range(0, int(arr.shape[0]) if arr.ndim else 0, step):
                arr[start:start + step]
        except Exception as exc:
            raise self.damaged(name, exc) from None
        return tuple(int(n) for n in arr.shape)

    def damaged(self, name: str, exc: BaseException | str) -> InputError:
        """The one-line error for a damaged array `name`: what, where, and what to do."""
        text = first_line(exc)
        err = InputError(f"{name} in workspace {self.path} is damaged ({text[:160]}); {remedy(name, self.path)}")
        err.detail = text[:160]  # type: ignore[attr-defined]  (for `vd info --check`'s list)
        return err

    def write_array(self, name: str, data: np.ndarray, chunks: tuple[int, ...] | None = None,
                    attrs: dict[str, Any] | None = None) -> zarr.Array:
        """Write a whole array atomically: build it under .tmp/, then rename it into place."""
        name = check_name(name)
        data = np.asarray(data)
        chunks = chunks or ((1,) + data.shape[1:] if data.ndim > 1 else data.shape)
        with self.staging() as tmp:
            arr = zarr.create_array(str(tmp), shape=data.shape, dtype=data.dtype, chunks=chunks,
                                    fill_value=0, overwrite=True)
            arr[...] = data
            if attrs:
                arr.attrs.update(json_safe(attrs))
            self._move_into_place(tmp, name)
        return self.array(name)

    def create_array(self, name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...],
                     overwrite: bool = False) -> zarr.Array:
        """Create an array to fill chunk by chunk (step-wise stages), zero-filled."""
        name = check_name(name)
        parent = name.rsplit("/", 1)[0] if "/" in name else ""
        if parent:
            self.require_group(parent)
        if self.has(name) and not overwrite:
            return self.array(name)
        return zarr.create_array(str(self.path / name), shape=shape, dtype=dtype, chunks=chunks,
                                 fill_value=0, overwrite=True)

    def remove(self, name: str) -> None:
        """Delete array or group `name` (moved aside first so a crash never leaves half of it)."""
        target = self.path / check_name(name)
        if target.exists():
            trash = self._tmp_dir() / f"trash-{uuid.uuid4().hex}"
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # ----------------------------------------------------------------- plain files
    def file_path(self, name: str) -> Path:
        """Path of a plain file inside the workspace (e.g. edits/tiger/edit.mp4)."""
        return self.path / check_name(name)

    def atomic_file(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """Yield a temporary path; on success it replaces workspace file `name` atomically."""
        return atomic_path(self.file_path(name))

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch directory under .tmp/ that is removed afterwards."""
        tmp = self._tmp_dir() / uuid.uuid4().hex
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def size_bytes(self, name: str = "") -> int:
        """Bytes on disk under `name` (whole workspace by default)."""
        root = self.path / check_name(name) if name else self.path
        if root.is_file():
            return root.stat().st_size
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    # ----------------------------------------------------------------- internals
    def _tmp_dir(self) -> Path:
        tmp = self.path / ".tmp"
        tmp.mkdir(exist_ok=True)
        return tmp

    def _move_into_place(self, built: Path, name: str) -> None:
        parent = name.rsplit("/", 1)[0] if "/" in name else ""
        if parent:
            self.require_group(parent)
        target = self.path / name
        old = None
        if target.exists():
            old = self._tmp_dir() / f"old-{uuid.uuid4().hex}"
            os.replace(target, old)
        os.replace(built, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remedy(name: str, path: str | Path = "WS") -> str:
    """What to run to rebuild a damaged array `name` of workspace `path`."""
    top = name.split("/")[0]
    if top in ("video", "masks"):
        return f"re-run `vd mask` for this clip with -o {path} (later stages then need --restart/--force)"
    if top == "inversion":
        return f"run `vd invert {path} --restart` to redo the inversion"
    if top == "edits":
        edit = name.split("/")[1] if "/" in name else "NAME"
        return f"redo the edit with `vd edit {path} --name {edit} --force ...`"
    if top == "eval":
        return f"re-run `vd eval {path}`"
    return f"rebuild it with the stage that wrote it, or start over with `vd mask ... -o {path} --force`"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); rename it onto `path` on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp-{uuid.uuid4().hex[:8]}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def edit_names(ws: Workspace) -> list[str]:
    """Names of the edit groups in the workspace (finished or not), sorted."""
    root = ws.path / "edits"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "zarr.json").is_file())


def edit_finished(ws: Workspace, name: str) -> bool:
    """True when edit `name` has its frames and finished (an edit without a status predates the field)."""
    return ws.has(f"edits/{name}/frames") and ws.group_attrs(f"edits/{name}").get("status", "done") == "done"
