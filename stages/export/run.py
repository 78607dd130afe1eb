"""Stage `vd export`: composite a finished edit back into the source footage (ARCHITECTURE.md §1, issue 27).

Per exported frame: decode the source frame, map the edit frame back through the inverse of the workspace's
resize (stages.method.composite), blend it in with a feathered alpha from the edited region
(stages.export.region), encode. Frames stream one at a time; the output is written to a temporary path
and renamed at the end, so a failed or interrupted export leaves nothing half-written.

Sampling: a workspace made with stride 1 exports every source frame of its span at the source's exact rate.
One made with --stride K or --fps R exports its sampled frames at the sampled rate (rate / K, or R), with a
note; no in-between frames are invented, and --whole-clip is refused for it.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stages.common.errors import InputError, Interrupted, UsageError
from stages.common.progress import Progress
from stages.export.config import CODECS, ExportConfig, auto_feather, crf_of, default_output, validate
from stages.export.media import (AudioPlan, PngWriter, SourceMedia, VideoWriter, encoder_of, iter_source,
                                 probe_source, writable_folder)
from stages.export.region import edit_region
from stages.io import locks
from stages.io.reads import Reads
from stages.io.workspace import Workspace, atomic_path, check_name, edit_finished, edit_names
from stages.method.composite import Geometry, paste


# ----------------------------------------------------------------------------------------- inputs
def refuse_stale_edit(ws: Workspace, name: str, reads: Reads | None = None) -> None:
    """InputError when edit `name` is stale (its inversion was redone or its inputs changed: stages.edit.fresh),
    with the command that makes it current: stale work is never delivered. `reads`: a Reads whose digests
    the check may reuse."""
    from stages.edit.fresh import stale_fix, stale_reason

    why = stale_reason(ws, name, reads)
    if why:
        raise InputError(f"{ws.path}: edit {name!r} is stale ({why}); {stale_fix(ws, name)}")


def pick_edit(ws: Workspace, name: str | None) -> str:
    """The edit to export: `name`, or the workspace's only finished edit."""
    names = edit_names(ws)
    if name is None:
        done = [n for n in names if edit_finished(ws, n)]
        if len(done) == 1:
            return done[0]
        if not done:
            raise InputError(f"{ws.path} has no finished edit; run `vd edit {ws.path} --prompt ...` first")
        raise UsageError(f"{ws.path} has {len(done)} finished edits ({', '.join(done)}); choose one with --edit NAME")
    name = check_name(name)
    if name not in names:
        listed = f"its edits: {', '.join(names)}" if names else "it has none"
        raise InputError(f"{ws.path} has no edit {name!r} ({listed})")
    if not edit_finished(ws, name):
        status = ws.group_attrs(f"edits/{name}").get("status")
        raise InputError(f"edit {name!r} in {ws.path} is not finished (status {status!r}); rerun `vd edit` "
                         f"with --name {name} --force")
    return name


def masks_changed(ws: Workspace, attrs: dict[str, Any], arrays: tuple[str, ...], reads: Reads | None = None
                  ) -> list[str]:
    """The mask arrays the export pastes with that changed since the edit (group attrs `attrs`) read them
    (its `reads` record); an edit without a record is taken as it is. Cheap: no model code is imported.
    `reads`: a Reads to share digests with the other checks."""
    recorded = attrs.get("reads") or {}
    return (reads or Reads(ws)).changed({a: recorded[a] for a in arrays if a in recorded})


def resolve_source(source: dict[str, Any], given: str | None) -> Path:
    """The source clip: `given` (--source) or the recorded path; its sha256 must equal the recorded one."""
    from stages.io.video import source_sha256

    stored = source.get("path")
    path = Path(given).expanduser() if given else Path(str(stored or ""))
    if not given and (not stored or not path.exists()):
        raise InputError(f"the source clip {stored} is missing; pass --source PATH to where it is now")
    if given and not path.exists():
        raise InputError(f"--source {given} not found")
    want = source.get("sha256")
    if want and source_sha256(path) != want:
        what = f"--source {given}" if given else f"the source clip {path}"
        raise InputError(f"{what} is not the clip this workspace was made from (its sha256 differs); "
                         f"pass --source with the original clip")
    return path


def fit(source_hw: tuple[int, int], size: tuple[int, int], mode: str) -> Geometry:
    """The Geometry of vd mask's resize (stages.io.video.fit_geometry) of source_hw frames to `size`."""
    from stages.io.video import fit_geometry

    scaled, offset = fit_geometry(source_hw, size, mode)
    return Geometry(source_hw, size, mode, tuple(scaled), tuple(offset))  # type: ignore[arg-type]


def geometry(source: dict[str, Any], media: SourceMedia) -> Geometry:
    """The workspace's resize as recorded by `vd mask`, checked against the decoded source size."""
    size = tuple(int(v) for v in source.get("size") or ())
    recorded = tuple(int(v) for v in source.get("source_size") or media.size)
    if len(size) != 2:
        raise InputError("the workspace records no frame size (attrs source.size); re-run `vd mask`")
    if recorded != tuple(media.size):
        raise InputError(f"the source decodes at {media.size[1]}x{media.size[0]} but the workspace was made from "
                         f"{recorded[1]}x{recorded[0]} frames; export needs the original clip")
    return fit(recorded, size, str(source.get("resize") or "crop"))  # type: ignore[arg-type]


def indices_of(source: dict[str, Any], frames: int) -> list[int]:
    """The source frame index of each workspace frame."""
    indices = source.get("indices")
    if indices:
        return [int(i) for i in indices]
    start, stride = int(source.get("start") or 0), int(source.get("stride") or 1)
    return [start + k * stride for k in range(frames)]


def is_sampled(source: dict[str, Any], indices: list[int]) -> bool:
    """Whether the workspace holds sampled frames (--fps, or a stride) rather than a consecutive span."""
    return bool(source.get("fps_sample")) or any(b - a != 1 for a, b in zip(indices, indices[1:]))


def out_rate(source: dict[str, Any], media: SourceMedia) -> Fraction:
    """The sampled rate: the source's exact rate / stride, or the --fps rate."""
    if source.get("fps_sample"):
        return Fraction(float(source["fps_sample"])).limit_denominator(1001)
    return media.rate / int(source.get("stride") or 1)


# ----------------------------------------------------------------------------------------- output
def _check_output(out: Path, codec: str, force: bool) -> None:
    folder = codec == "png"
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError(f"{out} exists; pass --force to replace it")
        if folder != out.is_dir():
            kind = "a folder" if out.is_dir() else "a file"
            raise InputError(f"{out} is {kind}; --codec {codec} writes {'a folder' if folder else 'a file'}; "
                             f"choose another -o")
    writable_folder(out.parent)


class _AtomicFolder:
    """A folder built beside `final` and renamed onto it at the end (the old one removed after)."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")

    def commit(self) -> None:
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------- plan
class Plan:
    """Which source frames the output holds and which edit frame each one gets."""

    def __init__(self, indices: list[int], whole: bool, sampled: bool):
        self.edit_of = {i: k for k, i in enumerate(indices)}
        self.first, self.last = indices[0], indices[-1]
        self.whole = whole
        self.sampled = sampled

    def wanted(self, index: int) -> bool:
        if self.whole:
            return True
        return index in self.edit_of if self.sampled else self.first <= index <= self.last

    def stop(self) -> int | None:
        return None if self.whole else self.last


def _frames(media: SourceMedia, plan: Plan) -> Iterator[Any]:
    for sf in iter_source(media, plan.stop()):
        if plan.wanted(sf.index):
            yield sf


# ----------------------------------------------------------------------------------------- entry point
@locks.scoped
def run_export(workspace: Workspace | str | Path, cfg: ExportConfig,
               progress: Progress | None = None) -> dict[str, Any]:
    """Composite edit `cfg.edit` into the source clip and write it (see the module docstring)."""
    progress = progress or Progress(quiet=True)
    started = time.perf_counter()
    validate(cfg)
    ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    name = pick_edit(ws, cfg.edit)
    out = Path(cfg.output).expanduser() if cfg.output else default_output(ws.path, name, cfg.codec)
    _check_output(out, cfg.codec, cfg.force)
    encoder = encoder_of(cfg.codec)
    locks.hold(ws.path, locks.WORKSPACE, "vd export", f"workspace {ws.path}", shared=True)
    locks.hold(ws.path, f"edits/{name}", "vd export", f"edit {name!r} in {ws.path}", shared=True)
    attrs = ws.group_attrs(f"edits/{name}")
    region = edit_region(ws, attrs)
    reads = Reads(ws)  # one digest of each array for both checks
    changed = masks_changed(ws, attrs, region.arrays, reads)
    if changed:
        raise InputError(f"{', '.join(changed)} changed since edit {name!r} was made, so its region no longer "
                         f"matches its frames; redo it with `vd edit {ws.path} --name {name} --force ...`")
    refuse_stale_edit(ws, name, reads)
    source = dict(ws.attrs.get("source") or {})
    media = probe_source(resolve_source(source, cfg.source))
    geom = geometry(source, media)
    if CODECS[cfg.codec].pix_fmt.startswith("yuv") and (media.size[0] % 2 or media.size[1] % 2):
        raise InputError(f"the source is {media.size[1]}x{media.size[0]}; {cfg.codec} needs even sides, "
                         f"use --codec ffv1 or png")
    frames = ws.array(f"edits/{name}/frames")
    count = int(frames.shape[0])
    if tuple(frames.shape[1:3]) != geom.size:
        raise InputError(f"edit {name!r} has frames of {frames.shape[2]}x{frames.shape[1]}, the workspace "
                         f"{geom.size[1]}x{geom.size[0]}; redo the edit")
    indices = indices_of(source, count)
    if len(indices) != count:
        raise InputError(f"edit {name!r} has {count} frames, the workspace records {len(indices)}; redo the edit")
    sampled = is_sampled(source, indices)
    if sampled and cfg.whole_clip:
        raise UsageError("--whole-clip needs a workspace of consecutive frames (this one was sampled with "
                         "--stride/--fps); export without --whole-clip to get the sampled frames at the "
                         "sampled rate")
    rate = out_rate(source, media) if sampled else media.rate
    if sampled:
        progress.log(f"note: the workspace samples the clip ({count} frames from {indices[0]} to {indices[-1]}); "
                     f"the export holds those frames at {_rate(rate)} fps (nothing in between is invented)")
    plan = Plan(indices, cfg.whole_clip, sampled)
    total = (media.frames if cfg.whole_clip else None) or (count if sampled else indices[-1] - indices[0] + 1)
    feather = cfg.feather if cfg.feather is not None else auto_feather(media.size)
    audio = cfg.audio == "copy" and media.audio is not None and cfg.codec != "png"
    if cfg.audio == "copy" and media.audio is not None and cfg.codec == "png":
        progress.log("note: a folder of PNGs has no audio track")

    seams: dict[str, list[float]] = {"before": [], "after": []}
    written = 0
    writer: Any = None
    folder = _AtomicFolder(out) if cfg.codec == "png" else None
    try:
        with _output(out, folder) as target, progress.task(f"export {name}", total=total) as advance:
            for sf in _frames(media, plan):
                if writer is None:  # opened at the first frame: the audio starts at its time
                    writer = _writer(target, cfg, media, rate, sf.time, total, audio)
                k = plan.edit_of.get(sf.index)
                if k is None:  # --whole-clip: a frame outside the span, as it is
                    writer.write(sf)
                else:
                    result = paste(sf.rgb(), np.asarray(frames[k]), region.frame(ws, k), geom, feather,
                                   cfg.color_match)
                    writer.write(sf, result.frame, result.roi)
                    for key, value in (("before", result.seam_before), ("after", result.seam_after)):
                        if value is not None:
                            seams[key].append(value)
                written += 1
                advance(1)
            if written < (indices[-1] + 1 if cfg.whole_clip else total):
                raise InputError(f"{media.path} ended after {written} exported frames; the workspace needs "
                                 f"frame {indices[-1]} (is it the clip the workspace was made from?)")
            closed = writer.close()
            writer = None
            if folder is not None:
                folder.commit()
    except KeyboardInterrupt:
        raise Interrupted(f"export interrupted; nothing was written to {out}") from None
    finally:
        if writer is not None and hasattr(writer, "abort"):
            writer.abort()
        if folder is not None:
            folder.discard()
    result = {
        "name": name, "output": str(out), "codec": cfg.codec, "encoder": encoder, "crf": crf_of(cfg),
        "frames": written, "size": list(media.size), "fps": _rate(rate), "rotation": media.rotation,
        "color": media.color.describe() if media.kind == "video" else None,
        "audio": closed.get("audio"), "span": [indices[0], indices[-1]], "whole_clip": cfg.whole_clip,
        "sampled": sampled, "region": region.kind, "feather": feather,
        "color_match": {"on": cfg.color_match, "seam_before": _mean(seams["before"]),
                        "seam_after": _mean(seams["after"])},
        "geometry": geom.describe(), "source": str(media.path),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _record(ws, name, out, cfg, feather, source, attrs, result)
    return result


class _output:
    """Context: yields the path to write (a temporary file, or the temporary PNG folder)."""

    def __init__(self, out: Path, folder: _AtomicFolder | None):
        self.out, self.folder = out, folder
        self._ctx: Any = None

    def __enter__(self) -> Path:
        if self.folder is not None:
            return self.folder.tmp
        self._ctx = atomic_path(self.out)
        return self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> bool:
        if self._ctx is not None:
            return bool(self._ctx.__exit__(*exc))
        return False


def _writer(target: Path, cfg: ExportConfig, media: SourceMedia, rate: Fraction, start: float, frames: int,
            audio: bool) -> Any:
    """The PNG folder or the video file, with the audio plan: from the first exported frame's time, for
    `frames` frames at `rate` (a span, re-encoded) or to the end (the whole clip, copied)."""
    if cfg.codec == "png":
        return PngWriter(target)
    plan = None
    if audio:
        end = None if cfg.whole_clip else start + frames / float(rate)
        plan = AudioPlan(start, end, copy=cfg.whole_clip)
    return VideoWriter(target, cfg.codec, media, rate, crf_of(cfg), plan)


def _rate(rate: Fraction) -> str:
    return f"{rate.numerator}/{rate.denominator}" if rate.denominator != 1 else str(rate.numerator)


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


# ----------------------------------------------------------------------------------------- record
def export_settings(cfg: ExportConfig, feather: int, source: dict[str, Any]) -> dict[str, Any]:
    """What an export's pixels depend on besides the edit (stored; stages.export.fresh compares it)."""
    return {"codec": cfg.codec, "crf": crf_of(cfg), "audio": cfg.audio, "whole_clip": cfg.whole_clip,
            "feather": feather, "color_match": cfg.color_match, "source_sha256": source.get("sha256")}


WS_PREFIX = "WS/"  # an export key relative to the workspace


def export_key(ws_path: Path, out: Path) -> str:
    """How an export is recorded in its edit's attrs (`exports`): relative to the workspace ("WS/edits/red/
    export.mp4", the default output) when it is inside it, so the record still holds when the workspace is
    moved or resumed from another node's scratch copy; else its absolute path."""
    out, root = Path(out).absolute(), Path(ws_path).absolute()
    try:
        return WS_PREFIX + out.relative_to(root).as_posix()
    except ValueError:
        return str(out)


def export_path(ws_path: Path, key: str) -> Path:
    """The file an export key names (export_key's inverse)."""
    return Path(ws_path) / key[len(WS_PREFIX):] if key.startswith(WS_PREFIX) else Path(key)


def edit_identity(attrs: dict[str, Any]) -> str:
    """A digest of the edit's attrs (its settings, reads and timings change whenever it is redone)."""
    from stages.common.digest import digest

    return digest({k: v for k, v in attrs.items() if k != "exports"})


def _record(ws: Workspace, name: str, out: Path, cfg: ExportConfig, feather: int, source: dict[str, Any],
            attrs: dict[str, Any], result: dict[str, Any]) -> None:
    exports = dict(ws.group_attrs(f"edits/{name}").get("exports") or {})
    exports[export_key(ws.path, out)] = {
        "settings": export_settings(cfg, feather, source), "edit": edit_identity(attrs),
        "frames": result["frames"], "fps": result["fps"], "seam": result["color_match"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    ws.update_attrs(f"edits/{name}", exports=exports)
