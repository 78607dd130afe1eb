"""The ellipse robustness mask: moment-equivalent ellipse of the largest 8-connected component."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.method.ellipse import Ellipse, edit_masks, ellipse_mask, fill_ellipse, fit_ellipse, largest_component


def rasterise(shape, row, col, semi_major, semi_minor, angle_deg):
    """Pixels whose centres satisfy the ellipse equation (written independently of stages.method.ellipse)."""
    rows, cols = np.indices(shape)
    t = np.deg2rad(angle_deg)
    x, y = cols - col, rows - row
    along = x * np.cos(t) + y * np.sin(t)
    across = -x * np.sin(t) + y * np.cos(t)
    return (along / semi_major) ** 2 + (across / semi_minor) ** 2 <= 1


def angle_diff(a: float, b: float) -> float:
    """Difference of axis orientations (mod 180 degrees)."""
    d = (a - b) % 180.0
    return min(d, 180.0 - d)


@pytest.mark.parametrize("angle", [0.0, 30.0, -55.0, 89.0, 90.0])
def test_fit_recovers_an_analytic_ellipse(angle):
    mask = rasterise((160, 200), 70.4, 95.7, 40.0, 15.0, angle)
    fit = fit_ellipse(mask)
    assert abs(fit.row - 70.4) < 0.5 and abs(fit.col - 95.7) < 0.5
    assert abs(fit.major - 80.0) < 1.0 and abs(fit.minor - 30.0) < 1.0
    assert angle_diff(fit.angle, angle) < 1.0
    assert -90.0 < fit.angle <= 90.0


def test_fitted_ellipse_covers_its_own_raster_almost_exactly():
    mask = rasterise((128, 128), 60.0, 66.0, 35.0, 20.0, 25.0)
    filled = fill_ellipse(mask.shape, fit_ellipse(mask))
    iou = (filled & mask).sum() / (filled | mask).sum()
    assert iou > 0.97
    merged = ellipse_mask(mask)
    assert (merged >= mask).all() and (merged.sum() - mask.sum()) / mask.sum() < 0.03


def test_ellipse_of_a_rectangle_has_moment_equivalent_axes():
    mask = np.zeros((100, 100), bool)
    mask[40:60, 20:80] = True  # 60 wide, 20 tall: axes 4*sqrt(L^2/12) for a uniform bar
    fit = fit_ellipse(mask)
    assert abs(fit.major - 4 * math.sqrt((60**2 - 1) / 12)) < 1e-6
    assert abs(fit.minor - 4 * math.sqrt((20**2 - 1) / 12)) < 1e-6
    assert angle_diff(fit.angle, 0.0) < 1e-6


def test_largest_component_wins_over_raster_order_and_uses_8_connectivity():
    mask = np.zeros((64, 64), np.uint8)
    mask[2:6, 2:6] = 1  # small blob first in raster order (the reference would pick it)
    mask[30:50, 20:44] = 1
    big = largest_component(mask)
    assert big.sum() == 20 * 24 and not big[3, 3]
    merged = ellipse_mask(mask)
    assert merged[2:6, 2:6].all() and merged.sum() > mask.sum()  # the raw blob stays, the ellipse is on the big one
    ellipse_only = merged.astype(bool) & ~mask.astype(bool)
    rows, cols = np.nonzero(ellipse_only)
    assert rows.min() > 20 and cols.min() > 10
    diagonal = np.zeros((8, 8), np.uint8)
    diagonal[1:3, 1:3] = 1
    diagonal[3:6, 3:6] = 1  # touches only at a corner: one 8-connected component
    assert largest_component(diagonal).sum() == 4 + 9


def test_edit_masks_per_frame_and_switch_off():
    raw = np.zeros((3, 40, 40), np.uint8)
    raw[0, 10:30, 10:14] = 1
    raw[0, 10:14, 10:30] = 1  # an L shape: the ellipse adds pixels
    raw[2, 5:9, 5:9] = 1
    edit = edit_masks(raw)
    assert edit.shape == raw.shape and edit.dtype == np.uint8 and set(np.unique(edit)) <= {0, 1}
    assert (edit >= raw).all() and edit[0].sum() > raw[0].sum()
    assert edit[1].sum() == 0  # an empty frame stays empty
    np.testing.assert_array_equal(edit_masks(raw, ellipse=False), raw)


def test_degenerate_regions_do_not_crash():
    line = np.zeros((20, 20), np.uint8)
    line[10, 3:17] = 1
    merged = ellipse_mask(line)
    assert (merged >= line).all()
    dot = np.zeros((5, 5), np.uint8)
    dot[2, 2] = 1
    assert ellipse_mask(dot)[2, 2] == 1
    assert fit_ellipse(np.zeros((4, 4))) is None
    assert fill_ellipse((5, 5), Ellipse(2, 2, 0, 0, 0)).sum() == 1
