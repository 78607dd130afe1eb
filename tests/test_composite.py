"""Compositing math (stages.method.composite): the inverse of the workspace's resize on hand-made cases,
the feathered alpha, the colour match and the paste's bit-exact background."""

from __future__ import annotations

import numpy as np
import pytest

from stages.io.video import fit_geometry, resize_frames
from stages.method.composite import (Geometry, box_alpha, composite, distance_outside, fit_color, inner_sides,
                                     mask_to_source, paste, region_alpha, ring, seam_error, to_source)


def geom(src: tuple[int, int], dst: tuple[int, int], mode: str) -> Geometry:
    scaled, offset = fit_geometry(src, dst, mode)
    return Geometry(src, dst, mode, scaled, offset)


# ----------------------------------------------------------------------------------------- geometry
def test_crop_geometry_by_hand():
    g = geom((100, 200), (64, 64), "crop")  # scale 0.64 covers the height; 128 px wide, cut 32 px each side
    assert (g.scaled, g.offset) == ((64, 128), (0, 32))
    assert g.scale == (0.64, 0.64) and g.shift == (0.0, -32.0)
    assert g.box == (0, 50, 100, 150)  # rows 0..100, columns 50..150 of the source
    assert g.to_source(0, 0) == pytest.approx((0.28125, 50.28125))  # (0.5 / 0.64 - 0.5, 32.5 / 0.64 - 0.5)
    assert g.to_source(63, 63) == pytest.approx((98.71875, 148.71875))  # 63.5 / 0.64 - 0.5, 95.5 / 0.64 - 0.5
    assert g.to_workspace(0.28125, 50.28125) == pytest.approx((0.0, 0.0))
    assert inner_sides(g) == (False, True, False, True)  # only the left and right cuts are seams


def test_crop_geometry_of_the_issue_workspace():
    g = geom((720, 1280), (128, 256), "crop")  # 1280x720 -> 256x128: scale 0.2, 144 rows, 8 cut at the top
    assert (g.scaled, g.offset) == ((144, 256), (8, 0))
    assert g.box == (40, 0, 680, 1280)
    assert g.to_source(0, 0) == pytest.approx((42.0, 2.0))  # (0.5 + 8) / 0.2 - 0.5, 0.5 / 0.2 - 0.5
    assert g.describe()["box"] == {"x": 0, "y": 40, "width": 1280, "height": 640}


def test_pad_geometry_by_hand():
    g = geom((100, 200), (64, 64), "pad")  # scale 0.32: 32x64 content, bars of 16 rows above and below
    assert (g.scaled, g.offset) == ((32, 64), (16, 0))
    assert g.window == (16, 0, 48, 64) and g.box == (0, 0, 100, 200)
    assert g.to_source(16, 0) == pytest.approx((1.0625, 1.0625))  # 0.5 / 0.32 - 0.5
    assert g.to_workspace(99.5, 199.5) == pytest.approx((48.0 - 0.5, 64.0 - 0.5))  # the content's far corner edge
    assert inner_sides(g) == (False, False, False, False)


def test_stretch_geometry_by_hand():
    g = geom((100, 200), (64, 64), "stretch")  # rows x0.64, columns x0.32
    assert (g.scaled, g.offset) == ((64, 64), (0, 0))
    assert g.scale == (0.64, 0.32) and g.box == (0, 0, 100, 200)
    assert g.to_source(0, 0) == pytest.approx((0.28125, 1.0625))
    assert g.to_source(32, 32) == pytest.approx((50.28125, 101.0625))  # 32.5 / 0.64 - 0.5, 32.5 / 0.32 - 0.5


def test_a_one_to_one_geometry_maps_the_image_unchanged():
    g = geom((64, 96), (64, 96), "crop")
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert np.array_equal(to_source(image, g), image)


def test_a_bright_column_lands_where_the_inverse_says():
    g = geom((100, 200), (64, 64), "crop")
    edit = np.zeros((64, 64), np.uint8)
    edit[:, 10] = 255  # workspace column 10 -> source column (10.5 + 32) / 0.64 - 0.5 = 65.9
    row = to_source(edit, g)[50].astype(float)
    assert row.shape == (100,)  # the box is 100 columns wide, starting at source column 50
    peak = 50 + np.sum(np.arange(100) * row) / row.sum()
    assert peak == pytest.approx(65.9, abs=0.3)


@pytest.mark.parametrize("mode,src,dst", [("crop", (90, 160), (64, 64)), ("pad", (90, 160), (64, 128)),
                                          ("stretch", (90, 160), (64, 64)), ("crop", (40, 60), (64, 128))])
def test_forward_resize_then_inverse_returns_the_source(mode, src, dst):
    """resize_frames (what vd mask did) followed by to_source reproduces a smooth source inside the box;
    a half-pixel error of the inverse would cost ~10 grey levels on this 40-px pattern."""
    h, w = src
    yy, xx = np.mgrid[0:h, 0:w]
    source = np.stack([128 + 90 * np.sin(2 * np.pi * xx / 40), 128 + 90 * np.sin(2 * np.pi * yy / 40),
                       np.full((h, w), 128.0)], -1).astype(np.uint8)
    g = geom(src, dst, mode)
    work = resize_frames(source[None], dst, mode)[0]
    back = to_source(work, g)
    v0, u0, v1, u1 = g.box
    inner = (slice(4, -4), slice(4, -4))
    err = np.abs(back.astype(float) - source[v0:v1, u0:u1].astype(float))[inner]
    assert err.mean() < 3.0, err.mean()


def test_pad_bars_are_never_sampled():
    g = geom((100, 200), (64, 64), "pad")
    edit = np.zeros((64, 64, 3), np.uint8)
    edit[16:48] = 200  # content 200, bars black
    back = to_source(edit, g)
    assert back.shape == (100, 200, 3) and back.min() == 200 and back.max() == 200


def test_mask_to_source_scales_a_box():
    g = geom((720, 1280), (128, 256), "crop")
    mask = np.zeros((128, 256), np.uint8)
    mask[32:96, 96:160] = 1  # -> source rows (32 + 8) * 5 = 200 .. 520, columns 480 .. 800
    m = mask_to_source(mask, g)  # over the box: rows 40..680
    rows, cols = np.flatnonzero(m.any(1)) + 40, np.flatnonzero(m.any(0))
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (200, 520, 480, 800)


# ----------------------------------------------------------------------------------------- alpha
def test_region_alpha_dilates_then_fades_to_exactly_zero():
    d = np.array([0, 1, 4, 5, 6, 7, 8, 9, np.inf], np.float32)
    a = region_alpha(d, 4.0)
    assert a[:3].tolist() == [1, 1, 1]  # inside and within the 4 px dilation
    assert 0 < a[4] < a[3] < 1 and a[4] == pytest.approx(0.5)  # halfway through the fade at 6 px
    assert a[6:].tolist() == [0, 0, 0]  # 2 * feather and beyond: exactly 0
    assert region_alpha(d, 0).tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]


def test_distance_outside_is_euclidean():
    region = np.zeros((20, 20), bool)
    region[10, 10] = True
    d = distance_outside(region)
    assert d[10, 10] == 0 and d[10, 13] == pytest.approx(3) and d[13, 14] == pytest.approx(5, abs=0.01)
    assert np.isinf(distance_outside(np.zeros((3, 3), bool))).all()


def test_box_alpha_fades_only_along_cut_sides():
    g = geom((100, 200), (64, 64), "crop")  # box columns 50..150, full height
    a = box_alpha(g, g.box, 4.0)
    assert a.shape == (100, 100)
    assert a[0, 50] == 1.0 and a[99, 50] == 1.0  # top/bottom are the frame's own edges: no fade
    assert a[50, 0] == 0.0 and 0 < a[50, 2] < 1 and a[50, 4] == 1.0  # the cut at column 50 fades over 4 px
    assert a[50, 99] == 0.0


# ----------------------------------------------------------------------------------------- colour
def test_fit_color_recovers_gain_and_offset():
    rng = np.random.default_rng(1)
    source = rng.uniform(30, 220, (50, 50, 3)).astype(np.float32)
    edit = (source - np.array([10, -5, 0], np.float32)) / np.array([1.1, 0.9, 1.0], np.float32)
    gain, offset = fit_color(edit, source, np.ones((50, 50), bool))
    assert gain == pytest.approx([1.1, 0.9, 1.0], abs=1e-4)
    assert offset == pytest.approx([10, -5, 0], abs=1e-2)
    assert fit_color(edit, source, np.zeros((50, 50), bool)) is None  # no ring: no fit


def test_seam_error_and_ring():
    src = np.full((4, 4, 3), 100, np.uint8)
    edit = np.full((4, 4, 3), 100, np.uint8)
    edit[..., 0] = 130  # 30 in one channel of three
    assert seam_error(edit, src, np.ones((4, 4), bool)) == pytest.approx(10.0)
    d = np.array([0, 1, 12, 13], np.float32)  # feather 3: ring width 2 * 3 + 4 = 10
    assert ring(d, 3).tolist() == [False, True, False, False]
    assert ring(d, 3, inner=2).tolist() == [False, False, True, False]  # (2, 12]


def test_composite_is_bit_exact_where_alpha_is_zero():
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    edit = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = np.zeros((8, 8), np.float32)
    alpha[:4] = 1.0
    alpha[4] = 0.5
    out = composite(src, edit, alpha)
    assert np.array_equal(out[5:], src[5:]) and np.array_equal(out[:4], edit[:4])
    assert np.abs(out[4].astype(int) - (src[4].astype(int) + edit[4].astype(int)) / 2).max() <= 0.5


# ----------------------------------------------------------------------------------------- paste
def test_paste_changes_only_the_feathered_region():
    g = geom((180, 320), (64, 128), "crop")  # 320x180 -> 128x64: scale 0.4, 72 rows, 4 cut at the top
    assert (g.scaled, g.offset, g.box) == ((72, 128), (4, 0), (10, 0, 170, 320))
    rng = np.random.default_rng(3)
    source = rng.integers(0, 256, (180, 320, 3), dtype=np.uint8)
    edit = np.full((64, 128, 3), 40, np.uint8)
    region = np.zeros((64, 128), bool)
    region[20:40, 50:80] = True  # -> source rows (20 + 4) / 0.4 = 60 .. 110, columns 125 .. 200
    p = paste(source, edit, region, g, feather=3, color_match=False)
    changed = np.any(p.frame != source, axis=-1)
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    assert rows[0] >= 60 - 7 and rows[-1] < 110 + 7 and cols[0] >= 125 - 7 and cols[-1] < 200 + 7
    assert (p.frame[65:105, 130:195] == 40).all()  # inside: the edit's colour
    assert p.seam_before is not None and p.seam_after == p.seam_before and p.gain is None


def test_paste_of_an_empty_region_is_the_source():
    g = geom((90, 160), (64, 64), "crop")
    source = np.random.default_rng(4).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    p = paste(source, np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), bool), g, 4)
    assert np.array_equal(p.frame, source) and p.roi is None


def test_whole_frame_paste_stays_inside_the_crop_box():
    g = geom((100, 200), (64, 64), "crop")  # box columns 50..150
    source = np.full((100, 200, 3), 10, np.uint8)
    p = paste(source, np.full((64, 64, 3), 250, np.uint8), None, g, feather=4)
    assert (p.frame[:, :50] == 10).all() and (p.frame[:, 150:] == 10).all()
    assert (p.frame[:, 54:146] == 250).all()  # full strength 4 px inside the cut sides
    assert 10 < p.frame[50, 52, 0] < 250


def test_colour_match_lowers_the_seam():
    g = geom((90, 160), (64, 128), "crop")  # 160x90 -> 128x64: scale 0.8
    yy, xx = np.mgrid[0:90, 0:160]
    source = np.stack([100 + 60 * np.sin(xx / 9.0), 120 + 50 * np.cos(yy / 7.0), 90 + 0 * xx], -1).astype(np.uint8)
    work = resize_frames(source[None], (64, 128), "crop")[0].astype(np.float32)
    shifted = np.clip(work * 0.9 + np.array([20, -10, 5]), 0, 255).astype(np.uint8)  # a VAE-like colour shift
    region = np.zeros((64, 128), bool)
    region[20:44, 40:80] = True
    p = paste(source, shifted, region, g, feather=3, color_match=True)
    assert p.seam_before > 8 and p.seam_after < 2.5, (p.seam_before, p.seam_after)
    assert p.gain[:2] == pytest.approx([1 / 0.9] * 2, abs=0.06)
    assert p.gain[2] == 1.0  # a flat channel has no gain to fit: its offset alone matches it
