"""`vd edit --first-frame IMAGE`: an edited first frame conditions the TARGET branch through AnimateDiff's
SparseCtrl RGB (stages.models.sparsectrl, ALGORITHM.md §13.4).

The image is mapped onto the workspace's frame size (the same size as is, else resized with the workspace's
own crop/pad/stretch rule, stages.io.video.resize_frames), VAE-encoded, and given to SparseCtrl at frame
index 0 with the condition mask set on frame 0 only. For sampling steps i < K its residuals, scaled by S, are
added to the edit (target) slots 0 and 1 of the 4-slot UNet call; the recon (source) slots 2 and 3 get zeros,
so the source branch, P2P, SA-I/SA-II, the local blend and STDG run as without it. With temporal windows only
the window holding frame 0 is conditioned. Checks that need no model run in `plan_first_frame` (before
anything is written); the image bytes are kept so the copy stored in the edit is the image that was used.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from stages.common.digest import digest
from stages.common.errors import InputError, UsageError
from stages.io.workspace import Workspace

if TYPE_CHECKING:
    from stages.invert import Inversion
    from stages.models.sparsectrl import SparseCtrl

TARGET_SLOTS = (0, 1)  # edit-uncond, edit-cond of the batch [edit-uncond, edit-cond, recon-uncond, recon-cond]
SLOTS = 4
DEFAULT_NAME = "first-frame"  # the edit name when the prompt changes no word
ASPECT_TOLERANCE = 0.01  # relative difference of width/height ratios still taken as the same aspect
MIN_SIDE = 8


@dataclass
class FirstFrame:
    """A checked first-frame image and its settings (EditJob.first_frame)."""

    path: str
    data: bytes  # the file as read (what the edit stores a copy of)
    image: np.ndarray  # uint8 (H, W, 3): mapped onto the workspace frame size
    sha256: str  # of `data`
    digest: str  # stages.common.digest of `image`
    size: tuple[int, int]  # (height, width) of the file
    mapping: str  # how the file became `image`
    scale: float
    steps: int | None  # None: every step
    controlnet: SparseCtrl | None = None  # set to skip loading (tests); else loaded for the edit
    weights: str | None = None  # "tiny-random" for a "tiny" inversion (sparsectrl.uses_random); None: located

    def describe(self) -> dict[str, Any]:
        """The record stored in the edit's attrs (`first_frame`)."""
        out = {"path": self.path, "sha256": self.sha256, "digest": self.digest,
               "size": [self.size[1], self.size[0]], "mapping": self.mapping, "scale": self.scale,
               "steps": self.steps, "frame_index": 0}
        return {**out, "sparsectrl": self.weights} if self.weights else out


# ----------------------------------------------------------------------------------------- checks
def check_settings(cfg: Any) -> None:
    """UsageError for a first-frame scale or step count no edit can use (finite numbers are checked by
    check_config before)."""
    if cfg.first_frame is not None and not str(cfg.first_frame).strip():
        raise UsageError("--first-frame needs an image path")
    scale = cfg.first_frame_scale
    if not math.isfinite(scale) or scale < 0:
        raise UsageError(f"--first-frame-scale must be a finite number >= 0, got {scale}")
    if cfg.first_frame_steps is not None and cfg.first_frame_steps < 0:
        raise UsageError(f"--first-frame-steps must be >= 0, got {cfg.first_frame_steps}")


def read_image(path: str | Path) -> tuple[bytes, np.ndarray]:
    """(file bytes, uint8 RGB (h, w, 3)) of one image; InputError naming what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"first-frame image {path} not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read first-frame image {path}: {exc.strerror or exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            frames, mode, bands = int(getattr(img, "n_frames", 1)), img.mode, len(img.getbands())
            if frames > 1:
                raise InputError(f"first-frame image {path} has {frames} frames; give a single image")
            if mode not in ("RGB", "RGBA", "P"):
                raise InputError(f"first-frame image {path} has {bands} channel(s) ({mode}); an RGB image is needed")
            rgba = np.asarray(img.convert("RGBA"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"first-frame image {path} is not a readable image ({reason})") from None
    if rgba[..., 3].min() < 255:
        raise InputError(f"first-frame image {path} has transparent pixels; flatten it onto a background first")
    return data, np.ascontiguousarray(rgba[..., :3])


def _same_aspect(hw: tuple[int, int], ref: tuple[int, int]) -> bool:
    (h, w), (rh, rw) = hw, ref
    return abs((w / h) / (rw / rh) - 1.0) <= ASPECT_TOLERANCE


def map_to_frame(ws: Workspace, image: np.ndarray, path: str) -> tuple[np.ndarray, str]:
    """The image at the workspace's frame size (H, W) and how it got there.

    The same size is used as is. An image with the aspect of the source frames (what `vd mask` resized)
    or of the workspace frames is resized with the workspace's resize rule (crop, pad or stretch, as
    stages.io.video.resize_frames applied to the clip), so it lines up with frame 0. Anything else
    cannot be mapped without guessing: InputError.
    """
    from stages.io.video import resize_frames

    frames_hw = tuple(int(n) for n in ws.array("video/frames").shape[1:3])
    source = ws.attrs.get("source") or {}
    mode = str(source.get("resize") or "crop")
    src_hw = tuple(int(n) for n in (source.get("source_size") or frames_hw))
    h, w = image.shape[:2]
    if (h, w) == frames_hw:
        return image, "as is"
    shown = f"{frames_hw[1]}x{frames_hw[0]}"
    if min(h, w) < MIN_SIDE:
        raise InputError(f"first-frame image {path} is {w}x{h}: too small to map onto the {shown} frames")
    if not (_same_aspect((h, w), src_hw) or _same_aspect((h, w), frames_hw)):  # type: ignore[arg-type]
        raise InputError(f"first-frame image {path} is {w}x{h}: it cannot be mapped onto the {shown} workspace "
                         f"frames (made from {src_hw[1]}x{src_hw[0]} source frames by {mode}); give a {shown} "
                         f"image or one with the source's aspect ratio")
    mapped = resize_frames(image[None], frames_hw, mode)[0]  # type: ignore[arg-type]
    return mapped, f"resized from {w}x{h} with the workspace's {mode} rule"


def plan_first_frame(ws: Workspace, cfg: Any) -> FirstFrame | None:
    """The checked first frame of an edit config (None without --first-frame); reads the image, no model."""
    if not cfg.first_frame:
        return None
    from stages.models.sparsectrl import RANDOM, uses_random

    data, image = read_image(cfg.first_frame)
    mapped, how = map_to_frame(ws, image, str(cfg.first_frame))
    spec = (ws.group_attrs("inversion").get("model") or {}).get("spec") if ws.has("inversion") else None
    return FirstFrame(path=str(cfg.first_frame), data=data, image=mapped, sha256=hashlib.sha256(data).hexdigest(),
                      digest=digest(mapped), size=(int(image.shape[0]), int(image.shape[1])), mapping=how,
                      scale=float(cfg.first_frame_scale), steps=cfg.first_frame_steps,
                      weights=RANDOM if uses_random(spec) else None)


def require_weights(jobs: Sequence[Any]) -> None:
    """ModelMissingError (exit 4) before any model loads when an edit needs SparseCtrl and it is absent."""
    from stages.models.sparsectrl import locate

    if any(j.first_frame.controlnet is None and j.first_frame.weights is None
           for j in jobs if getattr(j, "first_frame", None) is not None):
        locate()


# ----------------------------------------------------------------------------------------- outputs
def record(ws: Workspace, base: str, ff: FirstFrame) -> None:
    """Store the image in the edit's folder: the file as given (`first_frame<suffix>`, atomic), the mapped
    frame (array `first_frame`) and the `first_frame` attrs (digests, mapping, settings)."""
    suffix = Path(ff.path).suffix.lower() or ".png"
    name = f"{base}/first_frame{suffix}"
    with ws.atomic_file(name) as tmp:
        tmp.write_bytes(ff.data)
    ws.write_array(f"{base}/first_frame", ff.image)
    ws.update_attrs(base, first_frame={**ff.describe(), "copy": str(ws.file_path(name))})


def preview_panels(source: np.ndarray, ff: FirstFrame, result: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """Preview panels: source | edited first frame (held for the whole clip) | result."""
    still = np.broadcast_to(ff.image, (len(result),) + ff.image.shape)
    return [source, np.ascontiguousarray(still), result], ["source", "first frame", "edit"]


# ----------------------------------------------------------------------------------------- sampling
class FirstFrameControl:
    """SparseCtrl residuals for the target slots of one edit's UNet calls (see `residuals`)."""

    def __init__(self, ctrl: SparseCtrl, latent: torch.Tensor, scale: float, steps: int, device: torch.device,
                 compute_dtype: torch.dtype):
        self.ctrl, self.latent, self.scale, self.steps = ctrl, latent, scale, steps
        self.device, self.compute_dtype = device, compute_dtype
        self.calls = 0

    def residuals(self, i: int, start: int, end: int, t: int,
                  emb: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """(down residuals, mid residual) for UNet rows slot*n + frame of window [start, end) at step i, or
        None (no conditioning: i >= K, or a window without frame 0). `emb` is the window's (4n, 77, D)
        embedding; the target slots' rows get SparseCtrl's output, the other slots' rows zeros."""
        if i >= self.steps or start != 0:
            return None
        n = end - start
        model = self.ctrl.model
        dtype = next(model.parameters()).dtype
        rows = torch.cat([torch.arange(b * n, (b + 1) * n) for b in TARGET_SLOTS]).to(emb.device)
        k, (c, h, w) = len(TARGET_SLOTS), self.latent.shape
        cond = torch.zeros(k, c, n, h, w, device=self.device, dtype=dtype)
        mask = torch.zeros(k, 1, n, h, w, device=self.device, dtype=dtype)
        cond[:, :, 0] = self.latent.to(self.device, dtype)
        mask[:, :, 0] = 1.0  # frame 0 only
        enabled = self.compute_dtype != torch.float32
        with torch.autocast(device_type=self.device.type, dtype=self.compute_dtype, enabled=enabled):
            down, mid = model(cond.new_zeros(k, c, n, h, w), torch.tensor(int(t), device=self.device),
                              encoder_hidden_states=emb[rows].to(self.device), controlnet_cond=cond,
                              conditioning_mask=mask, conditioning_scale=self.scale, return_dict=False)
        self.calls += 1
        return [_to_slots(r, n) for r in down], _to_slots(mid, n)

    def describe(self) -> dict[str, Any]:
        """What the run did (edit stats `first_frame`)."""
        return {"scale": self.scale, "steps": self.steps, "calls": self.calls, "frame_index": 0,
                "slots": list(TARGET_SLOTS), "weights": self.ctrl.source, "fingerprint": self.ctrl.fingerprint}


def _to_slots(res: torch.Tensor, n: int) -> torch.Tensor:
    """(len(TARGET_SLOTS) * n, ...) SparseCtrl rows -> (4n, ...) UNet rows, zeros outside the target slots."""
    out = res.new_zeros((SLOTS * n,) + tuple(res.shape[1:]))
    for k, b in enumerate(TARGET_SLOTS):
        out[b * n:(b + 1) * n] = res[k * n:(k + 1) * n]
    return out


_LOADED: dict[tuple[Any, ...], Any] = {}  # the last SparseCtrl loaded (several edits of one run share it)


def _controlnet(models: Any, weights: str | None) -> SparseCtrl:
    from stages.models.sparsectrl import load_sparsectrl, locate, random_sparsectrl

    where = weights or str(locate()[0])
    key = (where, str(models.device), str(models.dtype), models.fingerprint)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = random_sparsectrl(models) if weights else load_sparsectrl(models)
    return _LOADED[key]


def first_frame_control(job: Any, models: Any, inv: Inversion, progress: Any = None) -> FirstFrameControl | None:
    """The SparseCtrl conditioning of `job` (None without --first-frame): the controlnet (loaded once per
    run unless the plan carries one; the tiny random one for a "tiny" inversion) and the VAE latent of the
    mapped image (the inversion's seed)."""
    from stages.models.ops import vae_encode

    ff: FirstFrame | None = getattr(job, "first_frame", None)
    if ff is None:
        return None
    ctrl = ff.controlnet if ff.controlnet is not None else _controlnet(models, ff.weights)
    if progress is not None:
        from stages.models.sparsectrl import RANDOM

        untrained = " (untrained, random weights: tests the plumbing only)" if ctrl.source == RANDOM else ""
        progress.log(f"first frame: SparseCtrl {ctrl.source}{untrained}")
    seed = int((inv.attrs.get("config") or {}).get("seed", 42))
    latent = vae_encode(models, ff.image[None], seed=seed)[0]
    steps = inv.steps if ff.steps is None else min(int(ff.steps), inv.steps)
    return FirstFrameControl(ctrl, latent, ff.scale, steps, models.device, models.dtype)
