"""The ellipse robustness mask (ALGORITHM.md §6.3, decision 5).

Per frame: take the largest 8-connected component of the mask, fit the ellipse with the same
normalised second central moments (full axis lengths 4*sqrt(eigenvalues), no extra scale), fill it
and unite it with the raw mask. Unlike the reference, the component is the largest one (not the first
in raster order) and centre/axes are not truncated to integers.

Angle convention: degrees from the +x (column) axis towards +y (row axis, pointing down), in (-90, 90].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Ellipse:
    """A filled ellipse in pixel coordinates (centre of pixel (r, c) is at (r, c))."""

    row: float
    col: float
    major: float  # full axis lengths
    minor: float
    angle: float  # degrees, major axis from +x towards +y (down), in (-90, 90]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D mask (bool); all False when the mask is empty."""
    labels, count = ndimage.label(np.asarray(mask) != 0, structure=_EIGHT)
    if count == 0:
        return np.zeros(labels.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))  # ties: the first label in raster order


def fit_ellipse(mask: np.ndarray) -> Ellipse | None:
    """Moment-equivalent ellipse of all non-zero pixels of a 2-D mask; None when it is empty."""
    rows, cols = np.nonzero(np.asarray(mask))
    if rows.size == 0:
        return None
    r0, c0 = rows.mean(), cols.mean()
    dr, dc = rows - r0, cols - c0
    cov = np.array([[np.mean(dc * dc), np.mean(dc * dr)],
                    [np.mean(dc * dr), np.mean(dr * dr)]])  # in (x, y) = (col, row) order
    values, vectors = np.linalg.eigh(cov)  # ascending
    values = np.clip(values, 0.0, None)
    vx, vy = vectors[:, 1]
    angle = math.degrees(math.atan2(vy, vx))
    if angle <= -90.0:
        angle += 180.0
    elif angle > 90.0:
        angle -= 180.0
    return Ellipse(float(r0), float(c0), 4.0 * math.sqrt(values[1]), 4.0 * math.sqrt(values[0]), angle)


def fill_ellipse(shape: tuple[int, int], ellipse: Ellipse) -> np.ndarray:
    """Bool mask of `shape` with the pixels whose centres lie inside `ellipse`."""
    height, width = shape
    theta = math.radians(ellipse.angle)
    # a degenerate (one-pixel-thick) region still gets a half-pixel wide ellipse
    a, b = max(ellipse.major / 2.0, 0.5), max(ellipse.minor / 2.0, 0.5)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = x - ellipse.col, y - ellipse.row
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def ellipse_mask(mask: np.ndarray) -> np.ndarray:
    """Raw 2-D mask united with the filled ellipse of its largest component (uint8 0/1)."""
    raw = np.asarray(mask) != 0
    ellipse = fit_ellipse(largest_component(raw))
    if ellipse is None:
        return raw.astype(np.uint8)
    return (raw | fill_ellipse(raw.shape, ellipse)).astype(np.uint8)


def edit_masks(raw: np.ndarray, ellipse: bool = True) -> np.ndarray:
    """masks/edit from masks/raw (F, H, W): per frame raw OR ellipse, or raw itself when `ellipse` is off."""
    raw = (np.asarray(raw) != 0).astype(np.uint8)
    if not ellipse:
        return raw.copy()
    return np.stack([ellipse_mask(m) for m in raw]) if len(raw) else raw.copy()
