"""Video in and out: decode a clip or an image folder, pick frames, resize, and write mp4/gif previews.

Frames are always uint8 RGB arrays (F, H, W, 3). Decoding uses PyAV (any container FFmpeg reads:
mp4, mov, webm, mkv, gif, avi, ...); a folder of images is read with Pillow in natural name order.
Every writer is atomic: it writes a temporary file beside the target and renames it into place.

A clip's identity (`source_sha256`) comes from content only: a video file is the sha256 of its bytes; an
image folder is a sha256 over every image's name and the sha256 of its bytes, so a frame replaced by
another of the same size is a changed clip. File digests come from stages.common.digest.file_sha256 (a
cache keyed by device, inode, size, mtime and ctime: restoring the old mtime does not fool it).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from stages.common.digest import file_sha256
from stages.common.errors import InputError, UsageError
from stages.io.workspace import atomic_path
from stages.common.errors import first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
FOLDER_FPS = 8.0  # an image folder has no frame rate; the reference writes 8 fps
RESIZE_MODES = ("crop", "stretch", "pad")


# ----------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class SourceInfo:
    """What is known about a clip before decoding it all."""

    path: Path
    kind: str  # "video" or "folder"
    fps: float
    size: tuple[int, int]  # (height, width) of the source frames
    frames: int | None  # None when the container does not say (mkv/webm): see count_frames


def natural_key(name: str) -> list[object]:
    """Sort key that orders 'f2.png' before 'f10.png'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, in natural name order (hidden files skipped)."""
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def source_sha256(path: str | Path) -> str:
    """A clip's content identity: the sha256 of a video file's bytes, or for an image folder a sha256 over
    each image's name and the sha256 of its bytes (in frame order). InputError when it cannot be read."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256(b"vd-image-folder/2\n")
    for p in list_images(path):
        digest.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _open_video(path: Path) -> Iterator[tuple[object, object]]:
    import av

    try:
        container = av.open(str(path))
    except Exception as exc:  # FFmpeg, OS and codec errors all mean the same to the user
        raise InputError(f"{path} is not a readable video ({_first_line(exc)})") from None
    try:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream
    finally:
        container.close()


def probe(path: str | Path) -> SourceInfo:
    """Open a clip (video file or image folder) and read its fps, size and frame count."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} not found")
    if path.is_dir():
        images = list_images(path)
        if not images:
            raise InputError(f"folder {path} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        first = read_image(images[0])
        return SourceInfo(path, "folder", FOLDER_FPS, first.shape[:2], len(images))
    if not os.access(path, os.R_OK):
        raise InputError(f"{path} is not readable (permission denied)")
    with _open_video(path) as (_, stream):
        fps = _stream_fps(stream)
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
        frames = int(stream.frames) or None
    if not height or not width:
        raise InputError(f"{path} is not a readable video (no frame size)")
    return SourceInfo(path, "video", fps, (height, width), frames)


def _stream_fps(stream: object) -> float:
    for rate in (getattr(stream, "average_rate", None), getattr(stream, "guessed_rate", None),
                 getattr(stream, "base_rate", None)):
        if rate:
            value = float(rate)
            if 0 < value < 1000:
                return value
    return FOLDER_FPS


def count_frames(path: str | Path) -> int:
    """Number of frames in a clip, decoding the whole video when the container does not say."""
    info = probe(path)
    if info.kind == "folder":
        return int(info.frames or 0)
    with _open_video(Path(path)) as (container, stream):
        try:
            return sum(1 for _ in container.decode(stream))
        except Exception as exc:  # av raises many error types for corrupt data
            raise InputError(f"{path} could not be decoded ({_first_line(exc)})") from None


def read_frames(path: str | Path, indices: Sequence[int]) -> tuple[np.ndarray, int | None]:
    """Decode the frames at `indices` (sorted, unique) as uint8 (len, h, w, 3).

    Returns the frames and the number of frames in the clip when decoding reached its end (else None).
    Raises InputError when the clip ends before the last index.
    """
    path = Path(path)
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return np.zeros((0, 1, 1, 3), np.uint8), None
    if path.is_dir():
        images = list_images(path)
        if wanted[-1] >= len(images):
            raise InputError(f"{path} has {len(images)} frames; the selection needs frame {wanted[-1]}")
        frames = [read_image(images[i]) for i in wanted]
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            raise InputError(f"images in {path} differ in size ({sorted(s[:2] for s in shapes)})")
        return np.stack(frames), len(images)
    got: dict[int, np.ndarray] = {}
    index = -1
    reached_end = True
    with _open_video(path) as (container, stream):
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    got[index] = frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    reached_end = False
                    break
        except Exception as exc:  # a damaged tail: keep what decoded, the count check below decides
            if not got:
                raise InputError(f"{path} could not be decoded ({_first_line(exc)})") from None
    total = index + 1 if reached_end else None
    if len(got) < len(wanted):
        raise InputError(f"{path} has {index + 1} frames; the selection needs frame {wanted[-1]} "
                         f"(use fewer --frames, a smaller --stride or --start)")
    return np.stack([got[i] for i in wanted]), total


def read_image(path: Path) -> np.ndarray:
    """One image file as uint8 RGB (H, W, 3); InputError when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise InputError(f"{path} is not a readable image ({_first_line(exc)})") from None


# ----------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """Which source frames become the clip, and the frame rate of the result."""

    indices: list[int]
    stride: int | None  # None when sampling by --fps
    fps_out: float


def _all_frames(source_fps: float, total: int | None, start: int, stride: int | None, fps: float | None,
                sample: str) -> int:
    """How many frames `--frames all` keeps: every stride-th (or fps-spaced) frame from start to the end."""
    if total is None:
        raise InputError("the clip's frame count is unknown, so --frames all cannot be used; give a number")
    if sample == "uniform" or total <= start:
        return max(total - start, 0)
    if fps:
        step, count = source_fps / fps, 0
        while start + int(math.floor(count * step + 0.5)) < total:
            count += 1
        return count
    return (total - 1 - start) // max(int(stride or 1), 1) + 1


def select_indices(frames: int, source_fps: float, total: int | None = None, start: int = 0,
                   stride: int | None = None, fps: float | None = None, sample: str = "stride") -> Selection:
    """Pick `frames` source indices.

    sample "stride": start, start+stride, ... (stride 1 by default) or, with `fps`, every
    source_fps/fps frames; sample "uniform" (the reference): stride floor((total-start)/frames).
    `total` is needed for "uniform" and used to check that the clip is long enough. frames 0 means every
    frame the selection reaches (`--frames all`; needs `total`).
    """
    if frames == 0:
        frames = _all_frames(source_fps, total, start, stride, fps, sample)
    if frames < 1:
        raise UsageError(f"--frames must be at least 1 (got {frames})")
    if start < 0:
        raise UsageError(f"--start must be >= 0 (got {start})")
    if stride is not None and fps is not None:
        raise UsageError("use either --stride or --fps, not both")
    if sample not in ("stride", "uniform"):
        raise UsageError(f"--sample must be 'stride' or 'uniform' (got {sample!r})")
    if sample == "uniform":
        if stride is not None or fps is not None:
            raise UsageError("--sample uniform picks its own stride; drop --stride/--fps")
        assert total is not None, "uniform sampling needs the frame count"
        stride = (total - start) // frames
        if stride < 1:
            raise InputError(f"clip has {total} frames from --start {start}; {frames} frames were asked")
    if fps is not None:
        if fps <= 0:
            raise UsageError(f"--fps must be positive (got {fps})")
        if fps > source_fps + 1e-6:
            raise UsageError(f"--fps {fps:g} is above the clip's {source_fps:g} fps")
        step = source_fps / fps
        indices = [start + int(math.floor(k * step + 0.5)) for k in range(frames)]
        selection = Selection(indices, None, float(fps))
    else:
        stride = 1 if stride is None else stride
        if stride < 1:
            raise UsageError(f"--stride must be >= 1 (got {stride})")
        selection = Selection([start + k * stride for k in range(frames)], stride, source_fps / stride)
    if total is not None and selection.indices[-1] >= total:
        raise InputError(f"clip has {total} frames; {frames} frames from --start {start} "
                         f"need frame {selection.indices[-1]} (use fewer --frames or a smaller --stride)")
    return selection


# ----------------------------------------------------------------------------------- sizes
def parse_size(text: str | int) -> tuple[int, int]:
    """'512' -> (512, 512); '512x320' (WIDTHxHEIGHT) -> (320, 512) as (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", str(text))
    if not match:
        raise UsageError(f"--size {text!r} must be N or WIDTHxHEIGHT, e.g. 512 or 512x320")
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    for value in (width, height):
        if value < 64 or value % 64:
            raise UsageError(f"--size {text}: each side must be a positive multiple of 64 (got {value})")
    return height, width


def fit_geometry(src_hw: tuple[int, int], dst_hw: tuple[int, int], mode: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """How a (h, w) source maps onto (H, W): the scaled size and the offset (oy, ox).

    crop: scale to cover, then cut (oy, ox) from the scaled image (offsets >= 0);
    pad: scale to fit, then place at (oy, ox) on a black canvas; stretch: scale to (H, W).
    """
    (h, w), (H, W) = src_hw, dst_hw
    if mode == "stretch":
        return (H, W), (0, 0)
    if mode == "crop":
        scale = max(H / h, W / w)
        sh, sw = max(H, int(round(h * scale))), max(W, int(round(w * scale)))
        return (sh, sw), ((sh - H) // 2, (sw - W) // 2)
    if mode == "pad":
        scale = min(H / h, W / w)
        sh, sw = min(H, max(1, int(round(h * scale)))), min(W, max(1, int(round(w * scale))))
        return (sh, sw), ((H - sh) // 2, (W - sw) // 2)
    raise UsageError(f"--resize must be one of {', '.join(RESIZE_MODES)} (got {mode!r})")


def resize_frames(frames: np.ndarray, size_hw: tuple[int, int], mode: str = "crop",
                  nearest: bool = False) -> np.ndarray:
    """Resize (F, h, w[, C]) uint8 frames to (F, H, W[, C]) with crop/pad/stretch.

    Images use area averaging when shrinking and bilinear when enlarging; masks (`nearest`) use
    centre-aligned nearest neighbour so they stay binary and line up with the frames.
    """
    import cv2

    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    H, W = size_hw
    (sh, sw), (oy, ox) = fit_geometry((h, w), (H, W), mode)
    if nearest:
        interp = cv2.INTER_NEAREST_EXACT
    else:
        interp = cv2.INTER_AREA if sh <= h and sw <= w else cv2.INTER_LINEAR
    out = np.zeros((len(frames), H, W) + frames.shape[3:], dtype=frames.dtype)
    for i, frame in enumerate(frames):
        scaled = frame if (sh, sw) == (h, w) else cv2.resize(frame, (sw, sh), interpolation=interp)
        if scaled.ndim < frame.ndim:  # cv2 drops a trailing channel axis of size 1
            scaled = scaled[..., None]
        if mode == "pad":
            out[i, oy:oy + sh, ox:ox + sw] = scaled
        else:
            out[i] = scaled[oy:oy + H, ox:ox + W]
    return out


# ----------------------------------------------------------------------------------- loading
@dataclass
class LoadedClip:
    """Decoded, selected and resized frames plus the description stored in the workspace."""

    frames: np.ndarray  # uint8 (F, H, W, 3)
    source: dict  # the workspace's root "source" attribute
    info: SourceInfo


def load_clip(path: str | Path, frames: int = 16, size: str | tuple[int, int] = "512", start: int = 0,
              stride: int | None = None, fps: float | None = None, sample: str = "stride",
              resize: str = "crop", sha256: str | None = None) -> LoadedClip:
    """Decode `path`, select frames, resize them; return frames and the source description.

    `sha256` skips re-hashing the source when the caller already has it.
    """
    size_hw = parse_size(size) if not isinstance(size, tuple) else size
    if resize not in RESIZE_MODES:
        raise UsageError(f"--resize must be one of {', '.join(RESIZE_MODES)} (got {resize!r})")
    info = probe(path)
    total = info.frames
    if (sample == "uniform" and total is None) or frames == 0:
        total = count_frames(path)  # --frames all: the exact count, not the container's estimate
    selection = select_indices(frames, info.fps, total, start, stride, fps, sample)
    frames = len(selection.indices)
    try:
        raw, seen = read_frames(path, selection.indices)
    except InputError:
        if sample == "uniform" and info.kind == "video" and info.frames is not None:
            # container metadata over-counted: recount by decoding and select again
            selection = select_indices(frames, info.fps, count_frames(path), start, stride, fps, sample)
            raw, seen = read_frames(path, selection.indices)
        else:
            raise
    out = resize_frames(raw, size_hw, resize)
    source = {
        "path": str(Path(path).resolve()),
        "kind": info.kind,
        "sha256": sha256 or source_sha256(path),
        "fps": info.fps,
        "fps_out": selection.fps_out,
        "fps_sample": fps,
        "sample": sample,
        "frames": frames,
        "size": [size_hw[0], size_hw[1]],
        "source_size": [int(raw.shape[1]), int(raw.shape[2])],
        "source_frames": total if total is not None else seen,
        "start": start,
        "stride": selection.stride,
        "resize": resize,
        "indices": selection.indices,
    }
    return LoadedClip(out, source, info)


# ----------------------------------------------------------------------------------- writing
def _even(frames: np.ndarray) -> np.ndarray:
    """Pad odd heights/widths by repeating the last row/column (yuv420p needs even sizes)."""
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Write uint8 (F, H, W, 3) frames as H.264 yuv420p mp4 (mpeg4 when libx264 is missing)."""
    import av

    frames = _even(_as_video(frames))
    rate = Fraction(float(fps)).limit_denominator(1001)
    codecs = [c for c in ("libx264", "mpeg4") if c in av.codecs_available]
    if not codecs:
        raise InputError("this FFmpeg build has neither libx264 nor mpeg4 encoders")
    with atomic_path(path) as tmp:
        for codec in codecs:
            try:
                _encode(tmp, frames, rate, codec, crf)
                break
            except av.error.FFmpegError:
                if codec == codecs[-1]:
                    raise
    return Path(path)


def _encode(path: Path, frames: np.ndarray, rate: Fraction, codec: str, crf: int) -> None:
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        else:
            stream.bit_rate = 8_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_gif(path: str | Path, frames: np.ndarray, fps: float, loop: int = 0) -> Path:
    """Write uint8 (F, H, W, 3) frames as a looping GIF (adaptive palette per frame)."""
    from PIL import Image

    frames = _as_video(frames)
    duration = max(20, int(round(1000.0 / max(float(fps), 1e-3) / 10.0)) * 10)  # GIF counts 1/100 s
    images = [Image.fromarray(np.ascontiguousarray(f)).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
              for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration,
                       loop=loop, disposal=1)
    return Path(path)


def side_by_side(*videos: np.ndarray, labels: Sequence[str] | None = None, gap: int = 4) -> np.ndarray:
    """Place videos (F, H_i, W_i, 3) next to each other (heights matched to the first), optional labels."""
    import cv2

    if not videos:
        raise ValueError("side_by_side needs at least one video")
    videos = tuple(_as_video(v) for v in videos)
    count = len(videos[0])
    if any(len(v) != count for v in videos):
        raise ValueError(f"videos differ in frame count: {[len(v) for v in videos]}")
    height = videos[0].shape[1]
    parts = []
    for k, video in enumerate(videos):
        if video.shape[1] != height:
            width = max(1, int(round(video.shape[2] * height / video.shape[1])))
            video = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in video])
        if labels and k < len(labels) and labels[k]:
            video = np.stack([_label(f, labels[k]) for f in video])
        if parts and gap:
            parts.append(np.full((count, height, gap, 3), 255, np.uint8))
        parts.append(video)
    return np.concatenate(parts, axis=2)


def _label(frame: np.ndarray, text: str) -> np.ndarray:
    import cv2

    frame = frame.copy()
    scale = max(0.3, frame.shape[0] / 512.0 * 0.7)
    org = (4, int(14 * scale / 0.5))
    cv2.putText(frame, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(frame, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return frame


def overlay_mask(frames: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
                 alpha: float = 0.45) -> np.ndarray:
    """Tint the pixels where `mask` (F, H, W) is non-zero with `color`; returns new uint8 frames."""
    frames = _as_video(frames)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != frames.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} does not match frames {frames.shape[:3]}")
    out = frames.astype(np.float32)
    tint = np.asarray(color, np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * tint
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _as_video(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def _first_line(exc: BaseException) -> str:
    # FFmpeg errors carry "[Errno N] reason: 'path'"; the reason alone reads better after our own path
    reason = getattr(exc, "strerror", None)
    if isinstance(reason, str) and reason.strip():
        return reason.strip()
    return first_line(exc)
