"""What a diffusers model folder holds: its weight files, and whether a folder is a loadable SD1.5 pipeline.
Path checks only (nothing is read or loaded); which file from_pretrained reads is stages.models.resolve.component."""

from __future__ import annotations

from pathlib import Path

from stages.models.catalog import MODEL_SUBFOLDERS, WEIGHT_SUFFIXES


def weight_files(folder: Path, subfolders: tuple[str, ...] = ("",)) -> list[Path]:
    """The weight files directly inside `folder`/<sub> for each of `subfolders`, sorted by name."""
    files: list[Path] = []
    for sub in subfolders:
        d = folder / sub if sub else folder
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    return files


def is_sd15_folder(path: Path) -> bool:
    """True when `path` has the config.json of every SD1.5 component vd loads."""
    return path.is_dir() and all((path / sub / "config.json").is_file() for sub in MODEL_SUBFOLDERS)


def sd15_folder_problem(folder: Path) -> str | None:
    """None when `folder` is a loadable SD1.5 diffusers folder, else what is missing."""
    if not folder.is_dir():
        return "not a folder"
    for sub in MODEL_SUBFOLDERS:
        if not (folder / sub / "config.json").is_file():
            return f"{sub}/config.json missing"
        if not weight_files(folder, (sub,)):
            return f"{sub} weights missing"
    return None


def adapter_folder_ok(folder: Path) -> bool:
    """True when `folder` is a diffusers MotionAdapter folder with weights."""
    return folder.is_dir() and (folder / "config.json").is_file() and bool(weight_files(folder))
