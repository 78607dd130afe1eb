"""Stage `vd mask`: clip -> workspace with video/frames, masks/raw, masks/edit, masks/objects/<name>/{raw,edit}
and masks/preview.gif. Several named objects are tracked in one SAM2 propagation (see stages.mask.objects).

Everything that can fail on user input (options, the clip, the masks, SAM2 weights, the target
workspace) is checked before the workspace is touched, so a failed run leaves nothing half-written.
A rerun on the same clip and frame selection reuses the workspace and replaces only video/ and masks/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.io import locks as stagelock

from stages.io import video as vid
from stages.method.ellipse import edit_masks
from stages.common.errors import InputError, UsageError
from stages.common.progress import Progress
from stages.io.workspace import LOCK_DIR, Workspace
from stages.mask.fresh import mask_settings
from stages.mask import objects as obj
from stages.mask.prompts import box_mask, check_prompts_inside, parse_box, parse_point
from stages.common.digest import digest
from stages.common.errors import first_line

__all__ = ["MaskConfig", "box_mask", "check_options", "check_prompts_inside", "default_workspace", "import_mask_dir",
           "import_mask_video", "parse_box", "parse_frames", "parse_point", "preview_frames", "run_mask"]

LATER_STAGES = ("inversion", "edits", "eval")
ALL_FRAMES = 0  # --frames all
MAX_FRAMES = 100000


@dataclass
class MaskConfig:
    """Options of `vd mask` (see docs/commands/mask.md)."""

    frames: int = 16  # 0: all (--frames all)
    size: str = "512"
    start: int = 0
    stride: int | None = None
    fps: float | None = None
    sample: str = "stride"
    resize: str = "crop"
    points: list[str] = field(default_factory=list)  # "X,Y" or "X,Y,LABEL" in output pixels
    box: str | None = None  # "X0,Y0,X1,Y1" in output pixels
    prompt_frame: int = 0
    sam2: str = "auto"  # tiny|small|base_plus|large|auto|random|PATH
    device: str = "auto"
    mask_dir: str | None = None
    mask_video: str | None = None
    box_only: bool = False
    ellipse: bool = True
    force: bool = False
    text: str | None = None  # single-object form: the detector finds the box from this phrase
    subject: str | None = None  # single-object form: the object's phrase; its name is the phrase with '_'
    objects: list[dict[str, Any]] = field(default_factory=list)  # [{name, phrase, points, box, text}]
    detector: str = "auto"  # Grounding DINO folder for --text (auto: $VD_GROUNDING_DINO or the HF cache)
    text_threshold: float = 0.3  # the least detector score a --text box needs


# ----------------------------------------------------------------------------------- imports
def _mask_from_image(path: Path) -> np.ndarray:
    """Any non-zero colour (palette index for paletted PNGs) is the object; alpha is ignored."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA"):
                img = img.convert("RGB" if img.mode == "RGBA" else "L")
            data = np.asarray(img)
    except Exception as exc:
        raise InputError(f"mask {path} is not a readable image ({first_line(exc)})") from None
    return (data.reshape(data.shape[0], data.shape[1], -1) != 0).any(axis=-1)


def _fit_masks(masks: np.ndarray, clip: vid.LoadedClip, origin: str) -> np.ndarray:
    """Bring (F, h, w) 0/1 masks to the output size with the frames' crop/pad, or accept them as is."""
    src = tuple(clip.source["source_size"])
    out = tuple(clip.source["size"])
    shape = tuple(masks.shape[1:3])
    if shape == src:
        return vid.resize_frames(masks.astype(np.uint8), out, clip.source["resize"], nearest=True)
    if shape == out:
        return masks.astype(np.uint8)
    raise InputError(f"{origin} masks are {shape[1]}x{shape[0]}; expected the clip's {src[1]}x{src[0]} "
                     f"or the output {out[1]}x{out[0]}")


def import_mask_dir(folder: str | Path, clip: vid.LoadedClip) -> np.ndarray:
    """Masks from a PNG folder: one per sampled frame, or one per source frame (sampled like the clip)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"mask folder {folder} not found")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"),
                   key=lambda p: vid.natural_key(p.name))
    if not files:
        raise InputError(f"mask folder {folder} has no .png files")
    indices = clip.source["indices"]
    count = len(indices)
    if len(files) != count:
        total = clip.source.get("source_frames")
        if total is None:
            total = vid.count_frames(clip.source["path"])
        if len(files) != total:
            raise InputError(f"mask folder {folder} has {len(files)} PNGs; expected {count} (one per sampled "
                             f"frame) or {total} (one per source frame)")
        files = [files[i] for i in indices]
    masks = [_mask_from_image(p) for p in files]
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise InputError(f"masks in {folder} differ in size ({', '.join(f'{w}x{h}' for h, w in sorted(shapes))})")
    return _fit_masks(np.stack(masks), clip, f"mask folder {folder}:")


def import_mask_video(path: str | Path, clip: vid.LoadedClip) -> np.ndarray:
    """Masks from a video decoded like the clip (same frame indices); grey level > 127 is the object."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"mask video {path} not found")
    frames, _ = vid.read_frames(path, clip.source["indices"])
    return _fit_masks(frames.max(axis=-1) > 127, clip, f"mask video {path}:")


# ----------------------------------------------------------------------------------- workspace
def default_workspace(clip: str | Path) -> Path:
    """<clip stem>.vd in the current directory."""
    path = Path(clip)
    stem = path.name if path.is_dir() else path.stem
    return Path.cwd() / f"{stem or 'clip'}.vd"


def _precheck_target(target: Path, sha256: str, force: bool) -> None:
    """Refuse early (before decoding or tracking) a target that is not ours to overwrite."""
    if target.exists() and not target.is_dir():
        raise InputError(f"{target} exists and is not a directory; choose another -o")
    if not target.is_dir() or not any(p.name != LOCK_DIR for p in target.iterdir()):
        return  # absent, empty, or only the lock folder a killed `vd mask` left
    if not (target / "zarr.json").is_file():
        raise InputError(f"{target} exists and is not a vd workspace; choose another -o")
    old = Workspace.open(target).attrs.get("source", {})
    if old.get("sha256") != sha256 and not force:
        raise InputError(f"workspace {target} was created from another clip ({old.get('path', '?')}); "
                         f"pass --force to replace it")


def _lock_workspace(target: Path) -> None:
    """`vd mask` rewrites frames and masks (and may remove later stages): the whole workspace, exclusively."""
    stagelock.hold(target, stagelock.WORKSPACE, "vd mask", f"workspace {target}")


def parse_frames(text: str | int) -> int:
    """--frames N, or 'all' (0: every frame the selection reaches)."""
    if isinstance(text, int):
        return text
    if str(text).strip().lower() == "all":
        return ALL_FRAMES
    try:
        frames = int(str(text).strip())
    except ValueError:
        raise UsageError(f"--frames must be a number or 'all', got {text!r}") from None
    if not 1 <= frames <= MAX_FRAMES:  # 0 is the internal sentinel for 'all', never a user's number
        raise UsageError(f"--frames must be in 1..{MAX_FRAMES} or 'all' (got {frames})")
    return frames


def check_options(cfg: MaskConfig) -> None:
    from stages.common.config import check_config

    check_config(cfg)  # types, finite numbers (--fps nan), int64
    if not (cfg.frames == ALL_FRAMES or 1 <= cfg.frames <= MAX_FRAMES):
        raise UsageError(f"--frames must be in 1..{MAX_FRAMES} or 'all' (got {cfg.frames})")
    if cfg.start < 0:
        raise UsageError(f"--start must be >= 0 (got {cfg.start})")
    if cfg.stride is not None and not 1 <= cfg.stride <= 100000:
        raise UsageError(f"--stride must be in 1..100000 (got {cfg.stride})")
    if cfg.fps is not None and not 0 < cfg.fps <= 1000:
        raise UsageError(f"--fps must be a number in (0, 1000] (got {cfg.fps})")
    imported = [name for name, value in (("--mask-dir", cfg.mask_dir), ("--mask-video", cfg.mask_video)) if value]
    if len(imported) > 1:
        raise UsageError("use either --mask-dir or --mask-video, not both")
    if imported and (cfg.points or cfg.box or cfg.text or cfg.objects):
        raise UsageError(f"{imported[0]} imports masks; drop --object/--point/--box/--text (they prompt SAM2)")
    if cfg.box_only and not cfg.objects and not cfg.box:
        raise UsageError("--box-only needs --box X0,Y0,X1,Y1 (one per object with --object)")
    if not (imported or cfg.points or cfg.box or cfg.text or cfg.objects):
        raise UsageError("no mask source: give --point/--box/--text (SAM2), --object NAME ..., --mask-dir DIR "
                         "or --mask-video FILE")
    if not 0 < cfg.text_threshold <= 1:
        raise UsageError(f"--text-threshold must be in (0, 1] (got {cfg.text_threshold})")
    specs = obj.object_specs(cfg)  # names, duplicates, objects without prompts
    if cfg.box_only:
        obj.check_box_only(specs, bool(cfg.objects))  # a box per object, nothing else
    if cfg.prompt_frame < 0:
        raise UsageError(f"--prompt-frame must be >= 0 (got {cfg.prompt_frame})")
    if cfg.frames != ALL_FRAMES and cfg.prompt_frame >= cfg.frames:
        raise UsageError(f"--prompt-frame {cfg.prompt_frame} is outside the {cfg.frames} frames")


# ----------------------------------------------------------------------------------- stage
@stagelock.scoped
def run_mask(clip: str | Path, output: str | Path | None, config: MaskConfig,
             progress: Progress | None = None) -> dict[str, Any]:
    """Create (or refresh) the workspace for `clip`; return a summary (see `vd mask --json`)."""
    from stages.models import sam2_track

    progress = progress or Progress(quiet=True)
    started = time.monotonic()
    check_options(config)
    size_hw = vid.parse_size(config.size)
    specs = obj.object_specs(config)
    clip = Path(clip)
    info = vid.probe(clip)  # not found / not a video fail here, before any slow work
    target = Path(output) if output else default_workspace(clip)
    sha256 = vid.source_sha256(clip)
    _precheck_target(target, sha256, config.force)
    existing = (target / "zarr.json").is_file()
    if existing:  # refuse a concurrent writer before the slow decoding and tracking
        _lock_workspace(target)
        relabelled = relabel_subject(target, config, sha256, specs, progress)
        if relabelled is not None:
            return relabelled

    method = "mask-dir" if config.mask_dir else "mask-video" if config.mask_video else \
        "box" if config.box_only else "sam2"
    checkpoint = detector = None
    if method == "sam2":
        checkpoint = sam2_track.resolve_checkpoint(config.sam2)  # exit 4 before decoding when missing
        if any(spec.text for spec in specs):
            from stages.models.detector import resolve_detector

            detector = resolve_detector(config.detector)

    progress.log(f"decoding {clip} ({info.kind}, {info.size[1]}x{info.size[0]}, {info.fps:g} fps)")
    loaded = vid.load_clip(clip, config.frames, size_hw, config.start, config.stride, config.fps,
                           config.sample, config.resize, sha256=sha256)
    frames = loaded.frames
    count, height, width = frames.shape[:3]
    if config.prompt_frame >= count:
        raise UsageError(f"--prompt-frame {config.prompt_frame} is outside the clip's {count} kept frames")
    obj.check_objects_inside(specs, height, width)

    mask_info: dict[str, Any] = {"method": method}
    pairs = np.zeros((len(specs), len(specs)), np.int64)
    scores: dict[str, float] = {}
    if method == "sam2":
        if detector is not None:
            from stages.mask.text import boxes_from_text

            found = boxes_from_text(specs, frames[config.prompt_frame], detector, config.text_threshold,
                                    config.prompt_frame, config.device, progress)
            for spec in specs:
                if spec.name in found:
                    spec.box, scores[spec.name] = found[spec.name].box, round(found[spec.name].score, 4)
        if detector is not None:
            from stages.models.detector import RANDOM, RANDOM_NAME

            mask_info["detector"] = RANDOM_NAME if detector == RANDOM else str(detector)
        progress.log(f"SAM2: {checkpoint or 'random weights (testing only)'}")
        predictor = sam2_track.load_predictor(checkpoint, config.device)
        masks, pairs = sam2_track.track_objects(predictor, frames, [(s.points, s.box) for s in specs],
                                                config.prompt_frame, progress)
        first = specs[0]
        mask_info.update(sam2=str(checkpoint) if checkpoint else sam2_track.RANDOM,
                         points=[list(p) for p in first.points] if len(specs) == 1 else [],
                         box=list(first.box) if len(specs) == 1 and first.box else None,
                         prompt_frame=config.prompt_frame)
    elif method == "box":
        progress.log("--box-only: each object's box on every frame (no tracking)")
        masks, pairs = obj.box_masks(specs, count, height, width)
        mask_info.update(box=list(specs[0].box) if len(specs) == 1 else None,  # type: ignore[arg-type]
                         prompt_frame=config.prompt_frame)
    elif method == "mask-dir":
        masks = import_mask_dir(config.mask_dir, loaded)[None]  # type: ignore[arg-type]
        mask_info.update(mask_dir=str(Path(config.mask_dir).resolve()))  # type: ignore[arg-type]
    else:
        masks = import_mask_video(config.mask_video, loaded)[None]  # type: ignore[arg-type]
        mask_info.update(mask_video=str(Path(config.mask_video).resolve()))  # type: ignore[arg-type]

    _check_prompt_frame(masks, specs, pairs, method, config.prompt_frame)
    raw = masks.max(axis=0)
    empty = [int(i) for i in np.nonzero(~raw.reshape(count, -1).any(axis=1))[0]]
    if empty:
        progress.log(f"warning: empty mask on frame(s) {empty}")
    edits = np.stack([edit_masks(m, config.ellipse) for m in masks])
    edit = edits.max(axis=0)
    overlaps = obj.overlap_report([s.name for s in specs], pairs)
    rule = "the smaller box" if method == "box" else "the higher SAM2 score"
    for key, pixels in overlaps.items():
        if pixels:
            progress.log(f"overlap {key}: {pixels} pixels over all frames, each given to {rule}")

    if not existing:
        _lock_workspace(target)
    ws, reused = _open_target(target, loaded.source, frames, config.force, progress)
    ws.write_array("video/frames", frames)
    old_masks = ws.group_attrs("masks").get("edit_sha256")
    ws.write_array("masks/raw", raw)
    ws.write_array("masks/edit", edit)
    objects = obj.write_objects(ws, specs, masks, edits, pairs)
    coverage_raw = [round(float(m.mean()), 5) for m in raw]
    coverage_edit = [round(float(m.mean()), 5) for m in edit]
    described = [dict(spec.summary(), coverage=objects["coverage"][spec.name],
                      **({"score": scores[spec.name]} if spec.name in scores else {})) for spec in specs]
    mask_info.update(ellipse=bool(config.ellipse), coverage_raw=coverage_raw, coverage_edit=coverage_edit,
                     empty_frames=empty, edit_sha256=digest(edit), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     objects=described)
    ws.update_attrs("masks", **{k: mask_info.get(k) for k in (
        "method", "ellipse", "sam2", "detector", "points", "box", "prompt_frame", "mask_dir", "mask_video",
        "coverage_raw", "coverage_edit", "empty_frames", "edit_sha256", "created", "objects")})
    ws.update_attrs("masks", settings=mask_settings(config, sha256))  # what stages.mask.fresh compares
    if reused and old_masks and old_masks != mask_info["edit_sha256"] and ws.has("inversion"):
        progress.log("note: masks changed; inversion/ was computed with the old masks "
                     "(rerun `vd invert --restart` to use the new ones)")
    preview = ws.file_path("masks/preview.gif")
    named = bool(config.objects or config.subject)
    if len(specs) == 1:
        shown = preview_frames(frames, raw, edit)
        if named:
            from stages.mask.preview import draw_names

            shown = draw_names(shown, [specs[0].name], [raw])
    else:
        from stages.mask.preview import preview_objects

        shown = preview_objects(frames, [s.name for s in specs], list(masks), list(edits))
    if method in ("sam2", "box"):  # the points and boxes the masks came from, on the prompt frame
        from stages.mask.preview import draw_prompts

        shown = draw_prompts(shown, [(s.points, s.box) for s in specs], config.prompt_frame)
    vid.write_gif(preview, shown, loaded.source["fps_out"])
    return {
        "workspace": str(ws.path.resolve()),
        "reused": reused,
        "source": loaded.source["path"],
        "frames": count,
        "indices": loaded.source["indices"],
        "size": [height, width],
        "fps": loaded.source["fps"],
        "fps_out": loaded.source["fps_out"],
        "mask": {"method": method, "ellipse": bool(config.ellipse), "coverage_raw": coverage_raw,
                 "coverage_edit": coverage_edit, "empty_frames": empty,
                 **{k: mask_info[k] for k in ("sam2", "detector") if mask_info.get(k)}},
        "objects": described,
        "overlap_pixels": overlaps,
        "preview": str(preview.resolve()),
        "seconds": round(time.monotonic() - started, 2),
    }


def relabel_subject(target: Path, config: MaskConfig, sha256: str, specs: Any,
                    progress: Progress) -> dict[str, Any] | None:
    """A new --subject for the single-object form with every other setting unchanged: the object is renamed
    and its phrase updated, its masks kept (nothing is decoded or tracked). None when that does not apply."""
    from stages.common.config import changed_settings

    if config.objects or len(specs) != 1:
        return None
    ws = Workspace.open(target)
    stored = ws.group_attrs("masks").get("settings") or {}
    objects = obj.read_objects(ws) or {}
    current = mask_settings(config, sha256)
    if (not stored or changed_settings(stored, current) != ["subject"] or len(objects.get("names") or []) != 1
            or (ws.attrs.get("source") or {}).get("sha256") != sha256):
        return None
    old, new = objects["names"][0], specs[0].name
    raw, edit = ws.read(f"{obj.GROUP}/{old}/raw"), ws.read(f"{obj.GROUP}/{old}/edit")
    written = obj.write_objects(ws, specs, raw[None], edit[None], np.zeros((1, 1), np.int64))
    masks = ws.group_attrs("masks")
    described = [dict(d, name=new, phrase=specs[0].phrase) for d in masks.get("objects") or []]
    ws.update_attrs("masks", objects=described, settings=current)
    progress.log(f"subject {stored.get('subject')!r} -> {config.subject!r}: object {old!r} renamed {new!r}, "
                 f"masks kept (nothing else changed)")
    source = ws.attrs.get("source") or {}
    return {
        "workspace": str(ws.path.resolve()), "reused": True, "relabelled": {"from": old, "to": new},
        "source": source.get("path"), "frames": int(source.get("frames") or len(masks.get("coverage_edit") or [])),
        "indices": source.get("indices"), "size": source.get("size"), "fps": source.get("fps"),
        "fps_out": source.get("fps_out"),
        "mask": {k: masks.get(k) for k in ("method", "ellipse", "coverage_raw", "coverage_edit", "empty_frames")},
        "objects": described, "overlap_pixels": written["overlap_pixels"],
        "preview": str(ws.file_path("masks/preview.gif").resolve()), "seconds": 0.0,
    }


def _check_prompt_frame(masks: np.ndarray, specs: Any, pairs: np.ndarray, method: str, frame: int) -> None:
    """Every object must be visible on the prompt frame (after the overlap resolution)."""
    for k, spec in enumerate(specs):
        if masks[k, frame].any():
            continue
        if method == "box" and len(specs) > 1:
            rivals = [specs[j].name for j in range(len(specs)) if j != k and pairs[min(j, k), max(j, k)] > 0]
            raise InputError(f"object {spec.name!r} is empty: its --box lies under object {rivals[0]!r}'s "
                             f"(overlaps go to the smaller box); give the objects different boxes")
        if method != "sam2":
            raise InputError(f"the mask on frame {frame} is empty (the given mask is empty); "
                             f"check the prompt coordinates (output pixels) or the masks")
        if len(specs) == 1:
            raise InputError(f"the mask on frame {frame} is empty (SAM2 found no object at the prompt); "
                             f"check the prompt coordinates (output pixels) or the masks")
        rivals = [specs[j].name for j in range(len(specs)) if j != k and pairs[min(j, k), max(j, k)] > 0]
        cover = f", or object {rivals[0]!r} scored higher on all of it" if rivals else ""
        raise InputError(f"object {spec.name!r} is empty on frame {frame} (SAM2 found nothing at its prompt"
                         f"{cover}); check its prompt (output pixels)")


def preview_frames(frames: np.ndarray, raw: np.ndarray, edit: np.ndarray) -> np.ndarray:
    """Frames with the raw mask tinted blue, the ellipse-only extension yellow, and the edit mask's
    outline in white (so the mask shows whatever the object's own colour)."""
    from scipy.ndimage import binary_erosion

    out = vid.overlay_mask(frames, raw, (30, 144, 255), 0.5)
    extra = (edit != 0) & (raw == 0)
    if extra.any():
        out = vid.overlay_mask(out, extra, (255, 220, 0), 0.35)
    inside = edit != 0
    outline = inside & ~np.stack([binary_erosion(m, iterations=max(1, m.shape[0] // 256)) for m in inside])
    out[outline] = 255
    return out


def _open_target(target: Path, source: dict[str, Any], frames: np.ndarray, force: bool,
                 progress: Progress) -> tuple[Workspace, bool]:
    """Create the workspace or reuse a same-clip one; refuse to silently stale later stages."""
    existed = (target / "zarr.json").is_file()
    ws = Workspace.create(target, source, force=force)  # refuses another clip/selection unless force
    reused = existed and ws.has("video/frames")
    if reused:
        old = ws.array("video/frames")
        changed = old.shape != frames.shape or digest(old[...]) != digest(frames)
        later = [name for name in LATER_STAGES if ws.has(name)]
        if changed and later:
            if not force:
                raise InputError(f"the frames differ from those in {target} and {', '.join(later)} would be "
                                 f"stale; pass --force to replace them")
            for name in later:
                ws.remove(name)
            progress.log(f"frames changed: removed {', '.join(later)}")
    return ws, reused


