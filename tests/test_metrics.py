"""Metric functions against hand-computed values (stages/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.quality import metrics as M
from stages.common.errors import InputError


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (good for optical flow), float in [0, 255]."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, size=(h, w, 3))
    tex = np.stack([gaussian_filter(noise[..., c], 2.0) for c in range(3)], axis=-1)
    tex = (tex - tex.min()) / (tex.max() - tex.min()) * 230 + 10
    return tex


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_identical_frames_give_psnr_inf_and_ssim_one():
    a = _texture(32, 32).astype(np.uint8)
    assert M.psnr(a, a) == math.inf
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert M.mse(a, a) == 0.0


def test_psnr_of_a_constant_offset_is_hand_computed():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 10, np.uint8)  # MSE = 100
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)  # 28.1308 dB


def test_psnr_of_known_gaussian_noise():
    rng = np.random.default_rng(1)
    a = np.full((128, 128, 3), 128.0)
    b = a + rng.normal(0, 5.0, a.shape)  # MSE ~ 25 -> 34.15 dB
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25), abs=0.08)
    # quantised to uint8 the error gains the rounding variance 1/12: still within 0.1 dB
    assert M.psnr(a.astype(np.uint8), np.round(b).astype(np.uint8)) == pytest.approx(34.15, abs=0.1)


def test_masked_psnr_only_looks_at_the_region():
    a = _texture(32, 32).astype(np.uint8)
    b = a.copy()
    b[:, 16:] = 0  # change only the right half
    region = np.zeros((32, 32), bool)
    region[:, :16] = True
    assert M.psnr(a, b, region) == math.inf
    b[:, 16:] = 255  # changing pixels outside the region does not move it
    assert M.psnr(a, b, region) == math.inf
    c = a.astype(np.int16)
    c[:, :16] += 10
    c[:, 16:] = 0
    assert M.psnr(a, np.clip(c, 0, 255).astype(np.uint8), region) < 40
    b2 = a.astype(np.float64)
    b2[:, :16] += 5.0
    assert M.psnr(a, b2, region) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)
    assert math.isnan(M.psnr(a, b, np.zeros((32, 32), bool)))


def test_ssim_of_flat_frames_is_the_luminance_term():
    a = np.full((16, 16, 3), 100.0)
    b = np.full((16, 16, 3), 120.0)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 120 + c1) / (100**2 + 120**2 + c1)  # contrast/structure terms are 1
    assert M.ssim(a, b) == pytest.approx(expected, abs=1e-12)
    assert M.ssim_map(a, b).shape == (16, 16)


def test_masked_ssim_is_the_region_mean_of_the_map():
    a = _texture(32, 32)
    b = a + np.random.default_rng(0).normal(0, 20, a.shape)
    region = np.zeros((32, 32), bool)
    region[4:12, 4:20] = True
    full = M.ssim_map(a, b)
    assert M.ssim(a, b, region) == pytest.approx(full[region].mean(), abs=1e-12)
    assert M.ssim(a, b) < 0.99


# ----------------------------------------------------------------------------- flow + warp error


def _shifted_pair(dx: int = 3, dy: int = 2, size: int = 64):
    big = _texture(size + 16, size + 16, seed=3)
    first = big[8 : 8 + size, 8 : 8 + size]
    second = big[8 - dy : 8 - dy + size, 8 - dx : 8 - dx + size]  # content moves by (+dx, +dy)
    return first.astype(np.uint8), second.astype(np.uint8)


def test_farneback_recovers_a_known_shift():
    a, b = _shifted_pair(3, 2)
    flow = M.farneback_flow(a, b)
    centre = flow[16:48, 16:48]
    assert np.median(centre[..., 0]) == pytest.approx(3.0, abs=0.3)
    assert np.median(centre[..., 1]) == pytest.approx(2.0, abs=0.3)


def test_warp_error_is_near_zero_after_flow_compensation_and_larger_without():
    a, b = _shifted_pair(3, 2)
    fwd, bwd = M.farneback_flow(a, b), M.farneback_flow(b, a)
    # an "edit" with the same motion but other colours, warped with the SOURCE flow
    ea, eb = (255 - a)[..., ::-1], (255 - b)[..., ::-1]
    compensated = M.warp_error(ea, eb, fwd, bwd)
    still = M.warp_error(ea, eb, np.zeros_like(fwd))
    assert compensated < 2e-4
    assert still > 20 * compensated
    # the region restricts which pixels count
    region = np.zeros(a.shape[:2], bool)
    region[20:40, 20:40] = True
    assert M.warp_error(ea, eb, fwd, bwd, region) < 2e-4
    assert math.isnan(M.warp_error(ea, eb, fwd, bwd, np.zeros_like(region)))


def test_occlusion_check_rejects_inconsistent_flow():
    fwd = np.zeros((8, 8, 2), np.float32)
    fwd[..., 0] = 2.0
    assert M.consistent_flow(fwd, -fwd)[:, :6].all()  # back and forth cancel (columns 6, 7 leave the frame)
    assert not M.consistent_flow(fwd, fwd).any()  # going further right both ways is an occlusion


def test_warp_back_samples_at_p_plus_flow():
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    flow = np.zeros((4, 4, 2), np.float32)
    flow[..., 0] = 1.0
    warped, inside = M.warp_back(img, flow)
    assert np.allclose(warped[:, :3], img[:, 1:])
    assert inside[:, :3].all() and not inside[:, 3].any()


# ----------------------------------------------------------------------------- smoothness


def test_smoothness_proxy_hand_values():
    ramp = np.stack([np.full((4, 4, 3), 10.0 * f) for f in range(5)])
    assert np.allclose(M.smoothness_proxy(ramp), 1.0)
    flicker = np.stack([np.full((4, 4, 3), 100.0 * (f % 2)) for f in range(4)])
    assert np.allclose(M.smoothness_proxy(flicker), 1.0 - 100.0 / 255.0)
    assert M.smoothness_proxy(ramp[:2]).shape == (0,)


def test_interpolation_smoothness_with_an_averaging_interpolator():
    ramp = np.stack([np.full((4, 4, 3), 10 * f, np.uint8) for f in range(6)])
    average = lambda a, b: ((a.astype(np.float64) + b) / 2).astype(np.uint8)  # noqa: E731
    assert M.interpolation_smoothness(ramp, average) == pytest.approx(1.0)
    flicker = np.stack([np.full((4, 4, 3), 100 * (f % 2), np.uint8) for f in range(5)])
    assert M.interpolation_smoothness(flicker, average) == pytest.approx((255 - 100) / 255)


# ----------------------------------------------------------------------------- LPIPS


def random_lpips_state(seed: int = 0) -> dict:
    """An AlexNet-LPIPS state dict with random (not pretrained) weights: only for testing the plumbing."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in torchvision.models.alexnet(weights=None).features.state_dict().items()}
    for k, ch in enumerate(M.LPIPS_CHANNELS["alex"]):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, ch, 1, 1)
    return state


def test_lpips_loads_a_single_safetensors_file_and_scores(tmp_path):
    from safetensors.torch import save_file

    save_file(random_lpips_state(), str(tmp_path / "lpips.safetensors"))
    net = M.lpips_from_state_dict(M.load_state_files(tmp_path / "lpips.safetensors"))
    assert net.kind == "alex"
    a = np.stack([_texture(64, 64, s).astype(np.uint8) for s in (0, 1)])
    b = a.copy()
    b[1] = 255 - b[1]
    values, maps = M.lpips_maps(net, a, b)
    assert values[0] == pytest.approx(0.0, abs=1e-9) and values[1] > 1e-3
    assert maps.shape == (2, 64, 64) and np.allclose(maps[0], 0.0) and maps[1].mean() > 0
    again, _ = M.lpips_maps(net, b, a)  # symmetric
    assert again[1] == pytest.approx(values[1], rel=1e-5)


def test_lpips_loads_a_folder_of_torch_files_and_rejects_incomplete_weights(tmp_path):
    import torch

    state = random_lpips_state()
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, tmp_path / "alexnet.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, tmp_path / "alex.pth")
    net = M.lpips_from_state_dict(M.load_state_files(tmp_path), str(tmp_path))
    assert len(net.lin) == 5
    (tmp_path / "alex.pth").unlink()
    with pytest.raises(InputError, match="lin0"):
        M.lpips_from_state_dict(M.load_state_files(tmp_path), str(tmp_path))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read weights"):
        M.load_state_files(tmp_path / "junk.pth")


# ----------------------------------------------------------------------------- text alignment


def test_clip_and_pick_score_conventions():
    cos = np.array([0.3, -0.1, 0.25])
    assert np.allclose(M.clip_score(cos), [30.0, 0.0, 25.0])
    assert np.allclose(M.pick_score(cos, 100.0), [30.0, -10.0, 25.0])


def test_ssim_map_matches_a_brute_force_window_at_an_interior_pixel():
    rng = np.random.default_rng(4)
    a = rng.uniform(0, 255, (24, 24, 3))
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
    g = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    y, x = 12, 9
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(3):
        pa, pb = a[y - 5 : y + 6, x - 5 : x + 6, ch], b[y - 5 : y + 6, x - 5 : x + 6, ch]
        ma, mb = (w * pa).sum(), (w * pb).sum()
        va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
        cov = (w * pa * pb).sum() - ma * mb
        vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    assert M.ssim_map(a, b)[y, x] == pytest.approx(np.mean(vals), abs=1e-9)
