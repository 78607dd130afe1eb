"""Whether a workspace's frames and masks are current for a clip and `vd mask` settings (used by `vd batch`).

`vd mask` records what its masks were made from as masks attrs `settings` (mask_settings): the clip's
sha256, every option that changes frames or masks, and the content of an imported mask folder or video.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from stages.common.config import changed_settings, config_dict
from stages.common.errors import VdError

RUNTIME = ("device", "force")  # options that never change what is made


def _mask_source_digest(path: str | None) -> str | None:
    """sha256 of an imported mask video, or over a mask folder's PNGs (names and bytes); None when absent."""
    if not path:
        return None
    from stages.io.video import source_sha256

    folder = Path(path)
    if not folder.is_dir():
        return source_sha256(folder) if folder.is_file() else None
    h = hashlib.sha256()
    for png in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"):
        h.update(png.name.encode() + b"\0" + hashlib.sha256(png.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def mask_settings(cfg: Any, clip_sha256: str) -> dict[str, Any]:
    """What `vd mask` output depends on: the clip's content and the options (mask folder/video by content)."""
    values = {k: v for k, v in config_dict(cfg).items() if k not in RUNTIME}
    values.update(clip_sha256=clip_sha256, mask_dir=_mask_source_digest(cfg.mask_dir),
                  mask_video=_mask_source_digest(cfg.mask_video))
    return values


def _show(key: str, old: Any, new: Any) -> str:
    return f"{key} {old!r} -> {new!r}" if len(repr(old)) + len(repr(new)) < 50 else key


def is_current(ws_path: str | Path, clip: str | Path, cfg: Any, sha256: str | None = None) -> tuple[bool, str]:
    """Whether the workspace at `ws_path` holds frames and masks that `run_mask(clip, ws_path, cfg)` would
    make again: (True, "") or (False, why). Reads only; `sha256` is the clip's, when already known."""
    from stages.io import video as vid
    from stages.io.workspace import Workspace

    path = Path(ws_path)
    if not (path / "zarr.json").is_file():
        return False, "no workspace yet"
    try:
        ws = Workspace.open(path)
        attrs = ws.attrs
    except VdError as exc:
        return False, str(exc)
    if not (ws.has("video/frames") and ws.has("masks/edit")):
        return False, "no frames and masks yet"
    sha = sha256 or vid.source_sha256(clip)
    if (attrs.get("source") or {}).get("sha256") != sha:
        return False, "the clip's content changed"
    stored = ws.group_attrs("masks").get("settings")
    if not stored:
        return False, "the masks were made by an older vd (no recorded settings)"
    current = mask_settings(cfg, sha)
    changed = changed_settings(stored, current)
    if changed:
        return False, "mask settings changed (" + "; ".join(_show(k, stored.get(k), current.get(k))
                                                           for k in changed) + ")"
    return True, ""
