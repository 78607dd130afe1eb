"""The export seam metric of `vd eval`: how far an edit's export (`vd export`) departs from the untouched
source footage in the band where it blends the edit in.

Per exported frame of the workspace's span, at the source resolution: `seam` is the mean absolute difference
(0..255, over channels) between the export and the decoded source frame on the feather band: the source pixels
inside the workspace's box, outside the edited region (mapped back through the workspace geometry, as the
export maps it), within max(2 * feather, 2) px of it; there the export's alpha falls from 1 to 0. 0 means the
export is the footage there, so no seam can show; a colour step of d grey levels in the edit's background
adds about d (what `--color-match` removes), and so does detail that the low-resolution edit lacks there.
Lossy codecs add their own loss (a fraction of a grey level at crf 18).

`seam_before_match` / `seam_after_match` are the export's own numbers (its summary's `color_match`): the
low-passed EDIT against the low-passed source on the colour-match ring, before and after the match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stages.common.errors import InputError, first_line
from stages.evaluate.config import clip_mean, unavailable
from stages.io.workspace import Workspace

HOW = "run `vd export WS --edit NAME` (then `vd eval` again)"


def pick_export(ws_path: Path, attrs: dict[str, Any]) -> tuple[Path, str, dict[str, Any]] | None:
    """The edit's newest export whose file still exists and was made from the edit as it is now (its
    `exports` records in the edit's attrs), as (path, key, record); None without one."""
    from stages.export.run import edit_identity, export_path

    identity = edit_identity(attrs)
    found = [(str(rec.get("created") or ""), key, rec) for key, rec in (attrs.get("exports") or {}).items()
             if isinstance(rec, dict) and rec.get("edit") == identity and export_path(ws_path, key).exists()]
    if not found:
        return None
    _created, key, record = max(found, key=lambda item: (item[0], item[1]))
    return export_path(ws_path, key), key, record


def export_identity(ws_path: Path, attrs: dict[str, Any]) -> list[Any] | None:
    """What the seam score of an edit read: the chosen export's key, record and content (None: none); the same
    on another node or after the workspace moved (no path or file time in it)."""
    from stages.common.digest import file_sha256

    chosen = pick_export(ws_path, attrs)
    if chosen is None:
        return None
    path, key, record = chosen
    content = file_sha256(path) if path.is_file() else sorted((p.name, file_sha256(p)) for p in path.iterdir())
    return [key, record.get("created"), record.get("settings"), content]


def export_seam(ws: Workspace, name: str, attrs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """({"seam", "seam_before_match", "seam_after_match"}, {"seam": per frame}, the export's path) of edit
    `name`; `seam` is unavailable (n/a, never an error) when the edit has no current export, or its source or
    export cannot be read."""
    from stages.export.run import export_path

    chosen = pick_export(ws.path, attrs)
    if chosen is None:
        stale = any(export_path(ws.path, key).exists() for key in (attrs.get("exports") or {}))
        reason = "its export is older than the edit" if stale else "the edit has no export"
        return {"seam": unavailable(reason, HOW + (" --force" if stale else ""))}, {}, None
    path, _key, record = chosen
    try:
        values = measure(ws, name, attrs, path, record)
    except InputError as exc:
        return {"seam": unavailable(f"cannot read the export or its source ({first_line(exc)})", HOW)}, {}, str(path)
    if all(v is None for v in values):
        return {"seam": unavailable("the edited region has no boundary band (a whole-frame or empty region)",
                                    "nothing to measure for this edit")}, {}, str(path)
    matched = record.get("seam") or {}
    out = {"seam": clip_mean([v for v in values if v is not None]),
           "seam_before_match": matched.get("seam_before"), "seam_after_match": matched.get("seam_after")}
    return out, {"seam": values}, str(path)


def measure(ws: Workspace, name: str, attrs: dict[str, Any], path: Path, record: dict[str, Any]) -> list[float | None]:
    """The seam (see the module docstring) of every workspace frame of edit `name` in export `path`; None
    for a frame whose region has no band. Streams both clips frame by frame."""
    from stages.export.media import iter_source, probe_source
    from stages.export.region import edit_region
    from stages.export.run import geometry, indices_of, is_sampled, resolve_source

    source = dict(ws.attrs.get("source") or {})
    media = probe_source(resolve_source(source, None))
    geom = geometry(source, media)
    exported = probe_source(path)
    if tuple(exported.size) != tuple(media.size):
        raise InputError(f"{path} is {exported.size[1]}x{exported.size[0]}, the source "
                         f"{media.size[1]}x{media.size[0]}")
    region = edit_region(ws, attrs)
    count = int(ws.array(f"edits/{name}/frames").shape[0])
    indices = indices_of(source, count)
    settings = record.get("settings") or {}
    feather = float(settings.get("feather") or 0)
    positions = export_positions(indices, bool(settings.get("whole_clip")), is_sampled(source, indices))
    sources = iter_source(media, indices[-1])
    exports = iter_source(exported, positions[-1])
    values: list[float | None] = []
    for k, (index, position) in enumerate(zip(indices, positions)):
        src, out = _seek(sources, index, media.path), _seek(exports, position, path)
        values.append(band_difference(out, src, region.frame(ws, k), geom, feather))
    return values


def export_positions(indices: list[int], whole_clip: bool, sampled: bool) -> list[int]:
    """The export's frame number of each workspace frame: the source index (--whole-clip), the workspace
    frame number (a sampled workspace exports only its frames) or the offset into the span."""
    if whole_clip:
        return list(indices)
    return list(range(len(indices))) if sampled else [i - indices[0] for i in indices]


def band_difference(export: np.ndarray, source: np.ndarray, region: np.ndarray | None, geom: Any,
                    feather: float) -> float | None:
    """Mean absolute difference of export and source frames (h, w, 3) on the feather band of `region`
    (workspace coordinates; None: the whole frame, which has no band) -> None without band pixels."""
    from stages.method.composite import distance_outside, mask_to_source, region_roi, seam_error

    if region is None:
        return None
    width = max(2.0 * feather, 2.0)
    roi = region_roi(region, geom, width + 1.0)
    if roi is None:
        return None
    v0, u0, v1, u1 = roi
    distance = distance_outside(mask_to_source(region, geom, roi))
    return seam_error(export[v0:v1, u0:u1], source[v0:v1, u0:u1], (distance > 0) & (distance <= width))


def _seek(frames: Iterator[Any], index: int, path: Path) -> np.ndarray:
    """The RGB of decoded frame `index` (frames before it are skipped without converting them)."""
    for frame in frames:
        if frame.index == index:
            return frame.rgb()
    raise InputError(f"{path} ends before frame {index}")
