"""What `vd eval` reads from a workspace: which items to score, the source clip, masks and flows."""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.common.errors import InputError
from stages.evaluate.config import GROUPS, RECON, EvalConfig
from stages.io.workspace import Workspace, check_name, edit_finished, edit_names
from stages.quality import metrics as M


def has_results(ws: Workspace) -> bool:
    """True when the workspace has a reconstruction or at least one finished edit."""
    return ws.has("inversion/reconstruction") or any(edit_finished(ws, n) for n in edit_names(ws))


def target_prompt(attrs: dict[str, Any]) -> str | None:
    """The prompt an edit aimed at, from its group attributes (None when it has none)."""
    for key in ("resolved_prompt", "target_prompt", "resolved prompt", "prompt"):
        if isinstance(attrs.get(key), str) and attrs[key]:
            return attrs[key]
    return None


def select_items(ws: Workspace, config: EvalConfig, metrics: list[str]) -> tuple[list[str], dict[str, str]]:
    """Which names to evaluate, and which were skipped (unfinished edits) with why."""
    names = edit_names(ws)
    has_recon = ws.has("inversion/reconstruction")
    if RECON in names:
        raise InputError(f"an edit is named {RECON!r}, which eval reserves for the inversion; delete "
                         f"{ws.path / 'edits' / RECON} and redo that edit with `vd edit --name OTHER`")
    skipped: dict[str, str] = {}
    if config.edits:
        targets = []
        for name in dict.fromkeys(config.edits):
            check_name(name)
            if name == RECON:
                if not has_recon:
                    raise InputError(f"{ws.path} has no inversion/reconstruction; run `vd invert` first")
            elif name not in names:
                listed = ", ".join(([RECON] if has_recon else []) + names) or "none"
                raise InputError(f"no edit named {name!r} in {ws.path}; available: {listed}")
            elif not edit_finished(ws, name):
                status = ws.group_attrs(f"edits/{name}").get("status", "unknown")
                raise InputError(f"edit {name!r} is not finished (status {status}); rerun `vd edit`")
            targets.append(name)
        return targets, skipped
    seams = "warp" in metrics and has_recon and seam_pairs(ws, int(ws.array("video/frames").shape[0])) is not None
    targets = [RECON] if has_recon and (seams or any(m in GROUPS["fidelity"] for m in metrics)) else []
    for name in names:
        if edit_finished(ws, name):
            targets.append(name)
        else:
            skipped[name] = f"not finished (status {ws.group_attrs(f'edits/{name}').get('status', 'unknown')})"
    if not targets and has_recon:
        raise InputError(f"nothing to evaluate in {ws.path}: the chosen metrics apply to edits and there is "
                         "no finished edit; run `vd edit` first")
    if not targets:
        raise InputError(f"nothing to evaluate in {ws.path}: no inversion/reconstruction and no finished "
                         "edit; run `vd invert` and `vd edit` first")
    return targets, skipped


class SourceClip:
    """Source frames, masks and (lazily) source optical flow of one workspace."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        if not ws.has("video/frames"):
            raise InputError(f"{ws.path} has no video/frames; create it with `vd mask CLIP`")
        if not ws.has("masks/edit"):
            raise InputError(f"{ws.path} has no masks/edit; run `vd mask` first")
        self.source = ws.read("video/frames")
        self.mask = ws.read("masks/edit").astype(bool)
        self.raw = ws.read("masks/raw").astype(bool) if ws.has("masks/raw") else self.mask
        if self.mask.shape != self.source.shape[:3] or self.raw.shape != self.source.shape[:3]:
            raise InputError(f"{ws.path}: masks {self.mask.shape} do not match video/frames {self.source.shape}")
        self._flows: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self.seam_pairs = seam_pairs(ws, len(self.source))

    def frames(self, name: str) -> np.ndarray:
        """The frames of item `name` (the reconstruction or an edit), checked against the source's shape."""
        key = "inversion/reconstruction" if name == RECON else f"edits/{name}/frames"
        frames = self.ws.read(key)
        if frames.shape != self.source.shape:
            raise InputError(f"{key} has shape {frames.shape} but video/frames is {self.source.shape}")
        return frames

    @property
    def flows(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Forward (f -> f+1) and backward (f+1 -> f) Farneback flows of the SOURCE video."""
        if self._flows is None:
            s = self.source
            fwd = [M.farneback_flow(s[f], s[f + 1]) for f in range(len(s) - 1)]
            bwd = [M.farneback_flow(s[f + 1], s[f]) for f in range(len(s) - 1)]
            self._flows = (fwd, bwd)
        return self._flows


def seam_pairs(ws: Workspace, frames: int) -> list[int] | None:
    """Frame pairs (f, f+1), by f, that cross a window border of the inversion; None with one window."""
    from stages.method.windows import plan_windows

    spec = ws.group_attrs("inversion").get("windows") or {}
    if not spec or len(spec.get("spans") or []) < 2:
        return None
    windows = plan_windows(frames, int(spec["window"]), int(spec["overlap"]))
    pairs = set()
    for s, e in windows.spans:
        if s > 0:
            pairs.add(s - 1)  # entering a window
        if e < frames:
            pairs.add(e - 1)  # leaving one
    return sorted(pairs)
