"""`vd export` settings: the config dataclass, its checks, the codec table and the default output path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.common.errors import UsageError


@dataclass(frozen=True)
class Codec:
    """One output codec: the FFmpeg encoders tried in order, pixel format, containers, default CRF."""

    encoders: tuple[str, ...]
    pix_fmt: str
    suffixes: tuple[str, ...]  # allowed output suffixes; the first is the default ("" = a folder of PNGs)
    crf: int | None = None  # default CRF (None: the codec takes none)


CODECS: dict[str, Codec] = {
    "h264": Codec(("libx264",), "yuv420p", (".mp4", ".mov", ".mkv"), crf=18),
    "h265": Codec(("libx265",), "yuv420p", (".mp4", ".mov", ".mkv"), crf=20),
    "prores": Codec(("prores_ks", "prores"), "yuv422p10le", (".mov", ".mkv")),
    "ffv1": Codec(("ffv1",), "bgr0", (".mkv",)),  # RGB: bit-exact with the decoded source
    "png": Codec(("png",), "rgb24", ("",)),
}
AUDIO = ("copy", "none")
MAX_FEATHER = 512


@dataclass
class ExportConfig:
    """Settings of one export (stored in the edit's attrs `exports`)."""

    edit: str | None = None  # edit name; None: the workspace's only finished edit
    output: str | None = None  # default: WS/edits/NAME/export.<suffix> (png: a folder WS/edits/NAME/export)
    source: str | None = None  # the source clip when it moved (its sha256 must match the workspace's)
    codec: str = "h264"
    crf: int | None = None  # h264/h265 only; default 18 (h264) / 20 (h265)
    audio: str = "copy"
    whole_clip: bool = False
    feather: int | None = None  # px at the source resolution; None: auto_feather(source size)
    color_match: bool = True
    force: bool = False


def auto_feather(source_hw: tuple[int, int]) -> int:
    """Default feather: 1/128 of the shorter source side, at least 2 px (1080p: 8 px, 720p: 6 px)."""
    return max(2, int(round(min(source_hw) / 128)))


def validate(cfg: ExportConfig) -> None:
    """Checks that need no workspace (UsageError, exit 2)."""
    from stages.common.config import check_config

    check_config(cfg)
    if cfg.codec not in CODECS:
        raise UsageError(f"--codec {cfg.codec!r}: choose one of {', '.join(CODECS)}")
    if cfg.audio not in AUDIO:
        raise UsageError(f"--audio {cfg.audio!r}: choose copy or none")
    if cfg.crf is not None:
        if CODECS[cfg.codec].crf is None:
            raise UsageError(f"--crf applies to h264 and h265; {cfg.codec} takes none")
        if not 0 <= cfg.crf <= 51:
            raise UsageError(f"--crf must lie in [0, 51] (got {cfg.crf})")
    if cfg.feather is not None and not 0 <= cfg.feather <= MAX_FEATHER:
        raise UsageError(f"--feather must lie in [0, {MAX_FEATHER}] px (got {cfg.feather})")
    if cfg.output:
        suffix = Path(cfg.output).suffix.lower()
        allowed = CODECS[cfg.codec].suffixes
        if cfg.codec == "png":
            if suffix == ".png":
                raise UsageError(f"-o {cfg.output}: --codec png writes a folder of %06d.png; give a folder name")
        elif suffix not in allowed:
            raise UsageError(f"-o {cfg.output}: {cfg.codec} goes into {' or '.join(allowed)} files")


def default_output(ws_path: Path, edit: str, codec: str) -> Path:
    """WS/edits/NAME/export.mp4 (h264, h265), export.mov (prores), export.mkv (ffv1), export/ (png)."""
    return Path(ws_path) / "edits" / edit / f"export{CODECS[codec].suffixes[0]}"


def crf_of(cfg: ExportConfig) -> int | None:
    """The CRF the encoder gets (the codec's default when --crf is not given)."""
    return cfg.crf if cfg.crf is not None else CODECS[cfg.codec].crf
