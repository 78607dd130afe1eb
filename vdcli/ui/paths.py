"""ROOT confinement for the page: every path a browser names is resolved (symlinks followed) and must lie
inside ROOT; clips and workspaces are listed from ROOT only; uploads are size-limited copies under
ROOT/uploads/, never executed (they are only ever decoded as video)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from stages.common.errors import InputError, UsageError

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
UPLOADS = "uploads"
LIST_DEPTH = 3  # folders below ROOT searched for clips and workspaces
LIST_LIMIT = 500  # entries listed at most (the page must open fast on a big ROOT)


class Root:
    """The one folder the page may read and write."""

    def __init__(self, path: str | Path):
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_dir():
            raise InputError(f"ROOT {path} is not a folder")
        self.path = resolved

    def inside(self, path: str | Path, what: str = "path") -> Path:
        """`path` (absolute, or relative to ROOT) resolved; InputError when it points outside ROOT."""
        text = str(path).strip() if path is not None else ""
        if not text:
            raise UsageError(f"no {what} given")
        candidate = Path(text).expanduser()
        resolved = (candidate if candidate.is_absolute() else self.path / candidate).resolve()
        if not self.contains(resolved):
            raise InputError(f"{what} {text} is outside the page's root {self.path}; the page only reads and "
                             f"writes inside it")
        return resolved

    def contains(self, path: str | Path) -> bool:
        """Whether `path` resolves (symlinks followed) inside ROOT."""
        resolved = Path(path).resolve()
        return resolved == self.path or self.path in resolved.parents

    def show(self, path: str | Path) -> str:
        """`path` relative to ROOT for display (absolute when outside)."""
        try:
            return str(Path(path).resolve().relative_to(self.path)) or "."
        except ValueError:
            return str(path)

    def _walk(self) -> list[tuple[Path, list[str], list[str]]]:
        found = []
        for folder, dirs, files in os.walk(self.path):
            here = Path(folder)
            depth = len(here.relative_to(self.path).parts)
            keep = []
            for name in sorted(dirs):
                if name.startswith(".") or (here / name / "zarr.json").is_file():
                    continue  # hidden folders, and never inside a workspace
                keep.append(name)
            workspaces = sorted(d for d in dirs if not d.startswith(".") and (here / d / "zarr.json").is_file())
            dirs[:] = keep if depth < LIST_DEPTH else []
            found.append((here, workspaces, sorted(files)))
            if len(found) > LIST_LIMIT:
                break
        return found

    def clips(self) -> list[str]:
        """Video files under ROOT (relative paths), uploads included."""
        out = [self.show(folder / name) for folder, _, files in self._walk() for name in files
               if name.lower().endswith(VIDEO_SUFFIXES) and not name.startswith(".")
               and self.contains(folder / name)]  # a link out of ROOT is not offered
        return out[:LIST_LIMIT]

    def workspaces(self) -> list[str]:
        """vd workspaces (folders with a zarr.json) under ROOT (relative paths)."""
        out = [self.show(folder / name) for folder, spaces, _ in self._walk() for name in spaces
               if self.contains(folder / name)]
        return out[:LIST_LIMIT]

    def save_upload(self, uploaded: str | Path, max_bytes: int, kind: str = "clip") -> Path:
        """Copy an uploaded clip (or first-frame image, `kind` "image") into ROOT/uploads/ under a safe name;
        refuse other types and big files."""
        source = Path(uploaded)
        suffixes = VIDEO_SUFFIXES if kind == "clip" else IMAGE_SUFFIXES
        if not source.is_file():
            raise InputError("the upload did not arrive; try again")
        if source.suffix.lower() not in suffixes:
            raise InputError(f"upload {source.name}: not {'a clip' if kind == 'clip' else 'an image'} "
                             f"({', '.join(suffixes)})")
        size = source.stat().st_size
        if size > max_bytes:
            raise InputError(f"upload {source.name} is {size / 2**20:.0f} MiB; the limit is "
                             f"{max_bytes / 2**20:.0f} MiB (vd ui --max-upload)")
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.stem).strip("._") or "clip"
        folder = self.path / UPLOADS
        folder.mkdir(exist_ok=True)
        target = folder / f"{stem}{source.suffix.lower()}"
        count = 1
        while target.exists():
            if target.stat().st_size == size and _same_bytes(target, source):
                return target
            count += 1
            target = folder / f"{stem}-{count}{source.suffix.lower()}"
        partial = folder / f".{target.name}.part"
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        return target


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def parse_bytes(text: str | int) -> int:
    """'500MB', '2GB', '1048576' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[iI]?[bB]?\s*", str(text))
    if not match:
        raise UsageError(f"--max-upload {text!r}: use a size such as 500MB or 2GB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2).lower()]
    value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise UsageError(f"--max-upload {text!r} must be more than 0")
    return value
