"""Compositing an edit back into its source footage (pure math, no I/O).

Geometry: `vd mask` maps a (h, w) source frame onto the (H, W) workspace by scaling it to (sh, sw) and then
cutting (crop) or placing (pad) at offset (oy, ox), or by scaling straight to (H, W) (stretch); see
stages.io.video.fit_geometry. Resizing is pixel-centre aligned (OpenCV's convention), so per axis a
source pixel edge coordinate u maps to the workspace edge coordinate X = u * k + t with k = sw / w and
t = -ox (crop), +ox (pad) or 0 (stretch). The inverse samples the edit at X for every source pixel centre.

Alpha: the edited region R (workspace mask mapped to the source resolution) is dilated by `feather` px and
then falls off smoothly over another `feather` px, so alpha is exactly 0 at distance >= 2 * feather from R.
Along the sides of the workspace's box that lie inside the frame (crop mode), alpha also falls to 0 over
`feather` px inward: outside the box there is no edit to show.

Compositing per pixel: out = src + alpha * (match(edit) - src), rounded; where alpha is 0, out == src.
Colour match: one gain and offset per channel, fitted by least squares on a ring of pixels just outside R
(where the edit should still show the source) between the low-passed edit and source, corrects the VAE
round trip's low-frequency colour shift. The seam metric is the mean absolute difference of the same two
low-passed images on that ring, before and after the match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_RING_PIXELS = 32  # fewer ring pixels than this: no colour fit (an unstable gain)
GAIN_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class Geometry:
    """How a workspace frame sits on its source frame; sizes are (height, width)."""

    source: tuple[int, int]  # (h, w) of the decoded source frames
    size: tuple[int, int]  # (H, W) of the workspace
    mode: str  # crop | pad | stretch
    scaled: tuple[int, int]  # (sh, sw): the source scaled before the crop / pad
    offset: tuple[int, int]  # (oy, ox): crop start in the scaled image, or pad position in the workspace

    @property
    def scale(self) -> tuple[float, float]:
        """(ky, kx): workspace pixels per source pixel along each axis."""
        return self.scaled[0] / self.source[0], self.scaled[1] / self.source[1]

    @property
    def shift(self) -> tuple[float, float]:
        """(ty, tx) of X = u * k + t (edge coordinates)."""
        sign = {"crop": -1, "pad": 1}.get(self.mode, 0)
        return float(sign * self.offset[0]), float(sign * self.offset[1])

    @property
    def window(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1): the workspace pixels that show the source (pad: without the bars)."""
        if self.mode == "pad":
            oy, ox = self.offset
            return oy, ox, oy + self.scaled[0], ox + self.scaled[1]
        return 0, 0, self.size[0], self.size[1]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(v0, u0, v1, u1): the source pixels whose centres the workspace covers (half-open)."""
        y0, x0, y1, x1 = self.window
        (ky, kx), (ty, tx) = self.scale, self.shift
        v0, v1 = _covered(y0, y1, ky, ty, self.source[0])
        u0, u1 = _covered(x0, x1, kx, tx, self.source[1])
        return v0, u0, v1, u1

    def to_source(self, y: float, x: float) -> tuple[float, float]:
        """Workspace pixel-centre coordinates (row y, column x) -> source pixel-centre coordinates (v, u)."""
        (ky, kx), (ty, tx) = self.scale, self.shift
        return (y + 0.5 - ty) / ky - 0.5, (x + 0.5 - tx) / kx - 0.5

    def to_workspace(self, v: float, u: float) -> tuple[float, float]:
        """Source pixel-centre coordinates (v, u) -> workspace pixel-centre coordinates (y, x)."""
        (ky, kx), (ty, tx) = self.scale, self.shift
        return (v + 0.5) * ky + ty - 0.5, (u + 0.5) * kx + tx - 0.5

    def describe(self) -> dict[str, object]:
        """JSON-friendly summary (what `vd export --json` and `vd info` show)."""
        v0, u0, v1, u1 = self.box
        return {"source_size": list(self.source), "size": list(self.size), "mode": self.mode,
                "scale": [round(k, 6) for k in self.scale], "scaled": list(self.scaled),
                "offset": list(self.offset), "box": {"x": u0, "y": v0, "width": u1 - u0, "height": v1 - v0}}


def _covered(x0: int, x1: int, k: float, t: float, n: int) -> tuple[int, int]:
    """Source pixels u whose centres map into the workspace edge interval [x0, x1]."""
    lo = math.ceil((x0 - t) / k - 0.5 - 1e-9)
    hi = math.floor((x1 - t) / k - 0.5 + 1e-9) + 1
    return max(0, lo), min(n, hi)


def inner_sides(geom: Geometry) -> tuple[bool, bool, bool, bool]:
    """Which sides (top, left, bottom, right) of the box lie inside the source frame (seams to feather)."""
    v0, u0, v1, u1 = geom.box
    return v0 > 0, u0 > 0, v1 < geom.source[0], u1 < geom.source[1]


# ----------------------------------------------------------------------------------------- resampling
def to_source(image: np.ndarray, geom: Geometry, roi: tuple[int, int, int, int] | None = None,
              smooth: bool = True) -> np.ndarray:
    """Map a workspace image (H, W[, 3]) uint8 onto the source pixels `roi` (v0, u0, v1, u1; default: the box).

    `smooth`: antialiased Lanczos (frames) or bilinear (masks, then thresholded by the caller). Pad bars are
    never sampled: the image is cut to the window and its edge replicated before resampling.
    """
    from PIL import Image

    v0, u0, v1, u1 = roi or geom.box
    y0, x0, y1, x1 = geom.window
    (ky, kx), (ty, tx) = geom.scale, geom.shift
    # a replicated border keeps the resampler's box and kernel (3 input px per output px) inside the image
    pad = 2 + math.ceil(3 * max(ky, kx, 1.0))
    part = np.ascontiguousarray(image[y0:y1, x0:x1])
    part = np.pad(part, ((pad, pad), (pad, pad)) + (((0, 0),) if part.ndim == 3 else ()), mode="edge")
    left, top = u0 * kx + tx - x0 + pad, v0 * ky + ty - y0 + pad
    box = (max(0.0, left), max(0.0, top), min(part.shape[1], left + (u1 - u0) * kx),
           min(part.shape[0], top + (v1 - v0) * ky))
    resample = Image.Resampling.LANCZOS if smooth else Image.Resampling.BILINEAR
    out = Image.fromarray(part).resize((u1 - u0, v1 - v0), resample, box=box)
    return np.asarray(out)


def mask_to_source(mask: np.ndarray, geom: Geometry, roi: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A workspace 0/1 mask (H, W) as a bool mask over the source pixels `roi` (bilinear, threshold 1/2)."""
    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    return to_source(m, geom, roi, smooth=False) >= 128


# ----------------------------------------------------------------------------------------- alpha
def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def distance_outside(region: np.ndarray) -> np.ndarray:
    """Euclidean distance (px) of every pixel to the nearest pixel of `region` (0 inside; inf without one)."""
    import cv2

    region = np.asarray(region, bool)
    if not region.any():
        return np.full(region.shape, np.inf, np.float32)
    return cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def region_alpha(distance: np.ndarray, feather: float) -> np.ndarray:
    """Alpha from the distance to the edited region: 1 up to `feather` px, smooth to 0 at 2 * `feather`."""
    if feather <= 0:
        return (distance <= 0).astype(np.float32)
    return _smoothstep(2.0 - distance / float(feather)).astype(np.float32)


def box_alpha(geom: Geometry, roi: tuple[int, int, int, int], feather: float) -> np.ndarray:
    """(v1-v0, u1-u0) alpha that falls to 0 over `feather` px towards the box's sides inside the frame."""
    v0, u0, v1, u1 = roi
    bv0, bu0, bv1, bu1 = geom.box
    top, left, bottom, right = inner_sides(geom)
    rows = np.arange(v0, v1, dtype=np.float32) + 0.5  # pixel centres
    cols = np.arange(u0, u1, dtype=np.float32) + 0.5
    inside_r = ((rows > bv0) & (rows < bv1)).astype(np.float32)
    inside_c = ((cols > bu0) & (cols < bu1)).astype(np.float32)
    if feather > 0:
        big = np.float32(1e9)
        dr = np.minimum(rows - bv0 if top else big, bv1 - rows if bottom else big)
        dc = np.minimum(cols - bu0 if left else big, bu1 - cols if right else big)
        inside_r *= _smoothstep((dr - 0.5) / float(feather))
        inside_c *= _smoothstep((dc - 0.5) / float(feather))
    return (inside_r[:, None] * inside_c[None, :]).astype(np.float32)


def ring(distance: np.ndarray, feather: float, inner: float = 0.0) -> np.ndarray:
    """The colour-match ring: pixels outside the region at a distance in (inner, inner + 2 * feather +
    max(feather, 4)] px from it."""
    width = 2.0 * feather + max(float(feather), 4.0)
    return (distance > inner) & (distance <= inner + width)


def low_sigma(geom: Geometry) -> float:
    """The low-pass scale (source px) of the colour match and the seam metric: one workspace pixel, >= 1."""
    return max(1.0, 1.0 / min(geom.scale))


def lowpass(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass (float32): the edit is a low-resolution picture at the source size, so only its
    low frequencies can be compared with the source's."""
    import cv2

    return cv2.GaussianBlur(np.asarray(image, np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


# ----------------------------------------------------------------------------------------- colour
def fit_color(edit: np.ndarray, source: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel gain and offset with gain * edit + offset ~ source on the pixels `where` (least squares,
    gain clamped to GAIN_RANGE); None when `where` has fewer than MIN_RING_PIXELS pixels."""
    if int(np.count_nonzero(where)) < MIN_RING_PIXELS:
        return None
    e = edit[where].astype(np.float64)
    s = source[where].astype(np.float64)
    me, ms = e.mean(axis=0), s.mean(axis=0)
    var = ((e - me) ** 2).mean(axis=0)
    cov = ((e - me) * (s - ms)).mean(axis=0)
    gain = np.where(var > 1e-6, cov / np.maximum(var, 1e-6), 1.0)
    gain = np.clip(gain, *GAIN_RANGE)
    return gain.astype(np.float32), (ms - gain * me).astype(np.float32)


def apply_color(edit: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """edit * gain + offset per channel, as float32 in [0, 255]."""
    return np.clip(edit.astype(np.float32) * gain + offset, 0.0, 255.0)


def seam_error(edit: np.ndarray, source: np.ndarray, where: np.ndarray) -> float | None:
    """Mean absolute difference (0..255, over channels) between edit and source on the ring `where` (paste
    passes both low-passed): how visible the seam of a feathered paste is. None without ring pixels."""
    if not np.any(where):
        return None
    return float(np.abs(edit[where].astype(np.float32) - source[where].astype(np.float32)).mean())


# ----------------------------------------------------------------------------------------- composite
def composite(source: np.ndarray, edit: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """source + alpha * (edit - source), rounded to uint8; bit-exact source where alpha == 0."""
    src = source.astype(np.float32)
    out = src + alpha[..., None] * (np.asarray(edit, np.float32) - src)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass
class Pasted:
    """One composited frame and what its colour match measured."""

    frame: np.ndarray  # uint8 (h, w, 3) at the source resolution
    roi: tuple[int, int, int, int] | None  # (v0, u0, v1, u1) the only pixels that may differ from the source
    seam_before: float | None  # seam_error on the ring before / after the colour match
    seam_after: float | None
    gain: list[float] | None = None
    offset: list[float] | None = None


def region_roi(region: np.ndarray | None, geom: Geometry, margin: float) -> tuple[int, int, int, int] | None:
    """Source pixels that can change: the region's bounding box mapped to the source, grown by `margin` px,
    within the box. None when the region is empty; the box for a whole-frame region (None)."""
    bv0, bu0, bv1, bu1 = geom.box
    if region is None:
        return bv0, bu0, bv1, bu1
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if not len(rows):
        return None
    (ky, kx), (ty, tx) = geom.scale, geom.shift
    grow = margin + 2.0  # + the bilinear mask's reach
    v0 = math.floor((rows[0] - ty) / ky - grow)
    v1 = math.ceil((rows[-1] + 1 - ty) / ky + grow)
    u0 = math.floor((cols[0] - tx) / kx - grow)
    u1 = math.ceil((cols[-1] + 1 - tx) / kx + grow)
    v0, u0, v1, u1 = max(v0, bv0), max(u0, bu0), min(v1, bv1), min(u1, bu1)
    return (v0, u0, v1, u1) if v1 > v0 and u1 > u0 else None


def paste(source: np.ndarray, edit: np.ndarray, region: np.ndarray | None, geom: Geometry, feather: float,
          color_match: bool = True) -> Pasted:
    """Composite workspace edit frame `edit` (H, W, 3) over source frame `source` (h, w, 3).

    `region`: bool (H, W) edited pixels in workspace coordinates, None for the whole frame. Pixels farther
    than 2 * feather from the mapped region (or outside the box) are the source's, bit for bit. The colour
    fit and the seam metric compare low-passed edit and source (lowpass, low_sigma) on the ring that starts
    2 sigma outside the region, where the low-passed edit no longer sees the edited content.
    """
    sigma = low_sigma(geom)
    inner = 2.0 * sigma
    roi = region_roi(region, geom, inner + 3.0 * feather + 4.0 + 3.0 * sigma)
    if roi is None:
        return Pasted(source.copy(), None, None, None)
    v0, u0, v1, u1 = roi
    edit_src = to_source(edit, geom, roi)
    reg = np.ones((v1 - v0, u1 - u0), bool) if region is None else mask_to_source(region, geom, roi)
    distance = distance_outside(reg)
    alpha = region_alpha(distance, feather) * box_alpha(geom, roi, feather)
    src = source[v0:v1, u0:u1]
    where = ring(distance, feather, inner)
    before = after = None
    gain = offset = None
    pasted: np.ndarray = edit_src
    if where.any():
        low_edit, low_src = lowpass(edit_src, sigma), lowpass(src, sigma)
        before = after = seam_error(low_edit, low_src, where)
        fit = fit_color(low_edit, low_src, where) if color_match else None
        if fit is not None:
            pasted = apply_color(edit_src, *fit)
            after = seam_error(apply_color(low_edit, *fit), low_src, where)
            gain, offset = [round(float(g), 4) for g in fit[0]], [round(float(o), 3) for o in fit[1]]
    out = source.copy()
    out[v0:v1, u0:u1] = composite(src, pasted, alpha)
    return Pasted(out, roi, before, after, gain, offset)
