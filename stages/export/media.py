"""The export's media I/O with PyAV: read the source frame by frame (exact rational rate, rotation, colour
tags), encode the output (a video file or a folder of PNGs) and carry the source's audio over.

Frames are uint8 RGB (h, w, 3) in the source's stored orientation (as `vd mask` decoded them); the output
keeps the source's display matrix, so players rotate it the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stages.common.errors import InputError, first_line
from stages.export.config import CODECS
from stages.io.video import FOLDER_FPS, list_images, probe, read_image

FOLDER_RATE = Fraction(FOLDER_FPS)  # an image folder has no frame rate; vd mask uses this one
_NAMES = {  # FFmpeg's names of the common colour tags (the numbers are H.273's)
    "primaries": {1: "bt709", 2: "unknown", 5: "bt470bg", 6: "smpte170m", 9: "bt2020", 12: "smpte432"},
    "trc": {1: "bt709", 2: "unknown", 6: "smpte170m", 13: "iec61966-2-1", 14: "bt2020-10", 16: "smpte2084",
            18: "arib-std-b67"},
    "space": {0: "gbr", 1: "bt709", 2: "unknown", 5: "bt470bg", 6: "smpte170m", 9: "bt2020nc"},
    "range": {0: "unknown", 1: "tv", 2: "pc"},
}


@dataclass
class Color:
    """A stream's colour tags as FFmpeg's enum numbers."""

    primaries: int = 2
    trc: int = 2
    space: int = 2
    range: int = 0

    def describe(self) -> dict[str, str]:
        return {k: _NAMES[k].get(getattr(self, k), str(getattr(self, k))) for k in _NAMES}


@dataclass
class SourceMedia:
    """What the export keeps of the source: size, exact rate, display matrix, colour tags, audio."""

    path: Path
    kind: str  # "video" or "folder"
    size: tuple[int, int]  # (h, w) stored (not rotated)
    rate: Fraction
    frames: int | None
    rotation: int = 0  # counter-clockwise degrees of the display matrix
    matrix: list[int] | None = None  # the display matrix itself (rotation and flips)
    color: Color = field(default_factory=Color)
    audio: str | None = None  # the audio codec's name, None without audio


def _fail(path: Path, exc: BaseException) -> InputError:
    return InputError(f"{path} could not be decoded ({first_line(exc)})")


def probe_source(path: Path) -> SourceMedia:
    """Open the source and read what the output must keep (decodes the first frame for its side data)."""
    import av

    if path.is_dir():
        info = probe(path)
        return SourceMedia(path, "folder", info.size, FOLDER_RATE, int(info.frames or 0))
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frame = next(container.decode(stream), None)
            if frame is None:
                raise InputError(f"{path} has no video frames")
            matrix = None
            for side in frame.side_data:
                if str(side.type).endswith("DISPLAYMATRIX"):
                    matrix = [int(v) for v in np.frombuffer(bytes(side), np.int32)[:9]]
            color = Color(int(frame.color_primaries), int(frame.color_trc), int(frame.colorspace),
                          int(frame.color_range))
            audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
            return SourceMedia(path, "video", (int(frame.height), int(frame.width)),
                               Fraction(rate) if rate else FOLDER_RATE, int(stream.frames) or None,
                               int(round(frame.rotation or 0)), matrix, color, audio)
    except InputError:
        raise
    except Exception as exc:  # FFmpeg and OS errors alike
        raise _fail(path, exc) from None


@dataclass
class SourceFrame:
    """One decoded source frame: its index, time (s) and RGB pixels on demand."""

    index: int
    time: float
    _frame: Any

    def rgb(self) -> np.ndarray:
        if isinstance(self._frame, np.ndarray):
            return self._frame
        return self._frame.to_ndarray(format="rgb24")  # the same conversion vd mask used

    def planes(self, pix_fmt: str) -> np.ndarray | None:
        """The decoded 4:2:0 planes as PyAV's (h * 3 / 2, w) array when the frame is `pix_fmt` == yuv420p
        with even sides (what the writer can splice into), else None."""
        frame = self._frame
        if isinstance(frame, np.ndarray) or pix_fmt != "yuv420p" or frame.format.name != pix_fmt:
            return None
        if frame.width % 2 or frame.height % 2:
            return None
        return frame.to_ndarray()


def iter_source(media: SourceMedia, stop: int | None = None) -> Iterator[SourceFrame]:
    """Decode the source in order, frame by frame (index counted as vd mask counts), up to index `stop`."""
    if media.kind == "folder":
        for k, image in enumerate(list_images(media.path)):
            if stop is not None and k > stop:
                return
            yield SourceFrame(k, k / float(media.rate), read_image(image))
        return
    import av

    try:
        with av.open(str(media.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for k, frame in enumerate(container.decode(stream)):
                if stop is not None and k > stop:
                    return
                time = float(frame.time) if frame.time is not None else k / float(media.rate)
                yield SourceFrame(k, time, frame)
    except av.error.FFmpegError as exc:
        raise _fail(media.path, exc) from None


# ----------------------------------------------------------------------------------------- encoders
def encoder_of(codec: str) -> str:
    """The first FFmpeg encoder this build has for `codec`; InputError naming the alternatives otherwise."""
    for name in CODECS[codec].encoders:
        if _has(name):
            return name
    have = [c for c in CODECS if c != codec and any(_has(e) for e in CODECS[c].encoders)]
    raise InputError(f"this FFmpeg build has no {codec} encoder ({'/'.join(CODECS[codec].encoders)}); "
                     f"use --codec {' or '.join(have) or '?'}")


def _has(encoder: str) -> bool:
    """Whether this FFmpeg build has the encoder."""
    import av

    try:
        av.Codec(encoder, "w")
        return True
    except Exception:
        return False


class PngWriter:
    """A folder of 000000.png, 000001.png, ... (RGB, no audio, no rotation or colour tags)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True)
        self.count = 0

    def write(self, source: "SourceFrame", rgb: np.ndarray | None = None,
              roi: tuple[int, int, int, int] | None = None) -> None:
        import cv2

        rgb = source.rgb() if rgb is None else rgb
        target = self.folder / f"{self.count:06d}.png"
        if not cv2.imwrite(str(target), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 3]):
            raise InputError(f"cannot write {target}")
        self.count += 1

    def close(self) -> dict[str, Any]:
        return {"audio": None}


class VideoWriter:
    """An h264/h265/prores/ffv1 file at the source's size, rate, display matrix and colour tags; the source's
    audio (AudioPump) is interleaved as frames are written."""

    def __init__(self, path: Path, codec: str, media: SourceMedia, rate: Fraction, crf: int | None,
                 audio: "AudioPlan | None"):
        import av

        self.codec = codec
        self.rate = rate
        self.color = media.color
        spec = CODECS[codec]
        self.container = av.open(str(path), mode="w")
        try:
            stream = self.container.add_stream(encoder_of(codec), rate=rate)
            height, width = media.size
            stream.width, stream.height = width, height
            stream.pix_fmt = spec.pix_fmt
            stream.codec_context.time_base = Fraction(rate.denominator, rate.numerator)
            options: dict[str, str] = {}
            if crf is not None:
                options["crf"] = str(crf)
            if codec == "h265":
                options["x265-params"] = "log-level=error"  # x265 prints its banner on stderr otherwise
                if path.suffix.lower() in (".mp4", ".mov"):
                    stream.codec_tag = "hvc1"  # what Apple players expect
            if codec == "prores":
                options["profile"] = "3"  # 422 HQ
            if codec == "ffv1":
                options["level"] = "3"
            stream.options = options
            cc = stream.codec_context
            rgb = spec.pix_fmt in ("bgr0", "rgb24")
            cc.color_primaries, cc.color_trc = self.color.primaries, self.color.trc
            cc.colorspace = 0 if rgb else self.color.space
            cc.color_range = 2 if rgb else self.color.range
            if media.matrix:
                stream.set_display_matrix(media.matrix)
            self.stream = stream
            self.pump = AudioPump(media.path, self.container, audio) if audio else None
        except Exception:
            self.container.close()
            raise
        self.count = 0

    def _frame(self, rgb: np.ndarray) -> Any:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        pix_fmt = CODECS[self.codec].pix_fmt
        if pix_fmt != "rgb24":
            yuv = not pix_fmt.startswith("bgr")
            # the inverse of the source's YUV -> RGB: the same matrix and range the decoder used
            frame = frame.reformat(format=pix_fmt, dst_colorspace=self.color.space if yuv else None,
                                   dst_color_range=self.color.range if yuv else None)
        return frame

    def _spliced(self, planes: np.ndarray, rgb: np.ndarray | None, roi: tuple[int, int, int, int] | None) -> Any:
        """The source's own 4:2:0 samples, with the composited pixels' conversion only inside `roi` (grown to
        whole chroma samples): untouched pixels skip the RGB round trip and lose only what the codec loses."""
        import av

        if rgb is not None and roi is not None:
            new = self._frame(rgb).to_ndarray()
            h, w = rgb.shape[:2]
            v0, u0, v1, u1 = roi[0] // 2, roi[1] // 2, (roi[2] + 1) // 2, (roi[3] + 1) // 2
            planes[2 * v0:2 * v1, 2 * u0:2 * u1] = new[2 * v0:2 * v1, 2 * u0:2 * u1]
            for start in (h, h + h // 4):  # U then V: (h/2, w/2) each, stored as h/4 rows of w
                src = planes[start:start + h // 4].reshape(h // 2, w // 2)
                src[v0:v1, u0:u1] = new[start:start + h // 4].reshape(h // 2, w // 2)[v0:v1, u0:u1]
        return av.VideoFrame.from_ndarray(planes, format="yuv420p")

    def write(self, source: "SourceFrame", rgb: np.ndarray | None = None,
              roi: tuple[int, int, int, int] | None = None) -> None:
        """Encode one frame: the source frame, or `rgb` (a composite that differs from it only inside `roi`)."""
        planes = source.planes(CODECS[self.codec].pix_fmt)
        if planes is not None:
            frame = self._spliced(planes, rgb, roi)
        else:
            frame = self._frame(source.rgb() if rgb is None else rgb)
        if not CODECS[self.codec].pix_fmt.startswith("bgr"):
            frame.colorspace, frame.color_range = self.color.space, self.color.range
        frame.color_primaries, frame.color_trc = self.color.primaries, self.color.trc
        frame.pts = self.count
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.count += 1
        if self.pump:
            self.pump.until(self.count / float(self.rate))

    def close(self) -> dict[str, Any]:
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
            audio = self.pump.finish() if self.pump else None
        finally:
            self.container.close()
        return {"audio": audio}

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:  # closing a broken output: the file is removed anyway
            pass


# ----------------------------------------------------------------------------------------- audio
@dataclass
class AudioPlan:
    """Which audio the output gets: source time [start, end) (end None: to the end); copy the packets
    (whole clip) or decode, trim and re-encode to AAC (a span)."""

    start: float
    end: float | None
    copy: bool


class AudioPump:
    """Muxes the source's audio into `out` in step with the video (until(t)), shifted to start at 0."""

    def __init__(self, source: Path, out: Any, plan: AudioPlan):
        import av

        self.plan = plan
        self.out = out
        self.input = av.open(str(source))
        self.src = self.input.streams.audio[0]
        self.samples = 0
        self.seconds = 0.0
        copy = plan.copy and self.src.codec_context.name in out.supported_codecs
        if copy:
            self.stream = out.add_stream_from_template(self.src)
            self.codec = self.src.codec_context.name
            self._packets = self._copy()
        else:
            rate = int(self.src.codec_context.sample_rate or 48000)
            self.stream = out.add_stream("aac", rate=rate)
            self.stream.layout = self.src.codec_context.layout
            self.stream.bit_rate = int(self.src.codec_context.bit_rate or 0) or 192_000
            self.codec = "aac"
            self._packets = self._reencode(rate)
        self.copied = copy
        self._pending: tuple[float, Any] | None = None
        self._done = False

    def _copy(self) -> Iterator[tuple[float, Any]]:
        tb = self.src.time_base
        shift = int(round(self.plan.start / float(tb)))
        for packet in self.input.demux(self.src):
            if packet.dts is None:
                continue
            packet.pts = None if packet.pts is None else packet.pts - shift
            packet.dts -= shift
            packet.stream = self.stream
            self.seconds = max(self.seconds, float((packet.pts or 0) + (packet.duration or 0)) * float(tb))
            yield float(packet.dts * tb), packet

    def _reencode(self, rate: int) -> Iterator[tuple[float, Any]]:
        import av

        layout = self.src.codec_context.layout
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        first = int(round(self.plan.start * rate))
        last = None if self.plan.end is None else int(round(self.plan.end * rate))
        position = None  # sample index of the next resampled sample on the source timeline
        done = False
        for packet in self.input.demux(self.src):
            for decoded in packet.decode():
                for frame in resampler.resample(decoded):
                    if position is None:
                        position = int(round(float(frame.time or 0.0) * rate))
                    data = frame.to_ndarray()
                    lo, hi = position, position + data.shape[1]
                    position = hi
                    a, b = max(lo, first), hi if last is None else min(hi, last)
                    if b <= a:
                        done = last is not None and lo >= last
                        continue
                    yield from self._encode(np.ascontiguousarray(data[:, a - lo:b - lo]), layout, rate)
            if done:
                break
        for packet in self.stream.encode(None):
            yield float(packet.pts or 0) / rate, packet

    def _encode(self, data: np.ndarray, layout: Any, rate: int) -> Iterator[tuple[float, Any]]:
        import av

        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = self.samples
        frame.time_base = Fraction(1, rate)
        self.samples += data.shape[1]
        self.seconds = self.samples / rate
        for packet in self.stream.encode(frame):
            yield float(packet.pts or 0) / rate, packet

    def until(self, t: float) -> None:
        """Mux every audio packet that starts before output time `t`."""
        while not self._done:
            if self._pending is None:
                self._pending = next(self._packets, None)
                if self._pending is None:
                    self._done = True
                    return
            when, packet = self._pending
            if when >= t:
                return
            self.out.mux(packet)
            self._pending = None

    def finish(self) -> dict[str, Any]:
        """Mux the rest; what was written."""
        try:
            self.until(float("inf"))
        finally:
            self.input.close()
        return {"codec": self.codec, "copied": self.copied, "duration": round(self.seconds, 4)}


def writable_folder(folder: Path) -> None:
    """InputError (one line) when `folder` cannot be created or written into."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot write into {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into {folder}: permission denied")
