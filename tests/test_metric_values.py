"""Metric values against hand computations: LPIPS on a tiny fixed-weight network (numpy reference written
from the LPIPS definition), and `vd eval`'s per-clip averaging of PSNR / LPIPS / warp error against
independent per-frame loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_workspace
from stages.quality import metrics as M
from stages.evaluate import EvalConfig, run_eval

SHIFT = np.array([-0.030, -0.088, -0.188])  # LPIPS input normalisation (Zhang et al. 2018)
SCALE = np.array([0.458, 0.448, 0.450])
W0 = np.array([[0.5, -0.3, 0.2], [-0.4, 0.6, 0.1]])
B0 = np.array([0.05, -0.02])
W3 = np.array([[0.7, -0.2], [0.1, 0.9], [-0.5, 0.4]])
B3 = np.array([0.01, 0.03, -0.02])
W8 = np.array([[0.3, -0.6, 0.2], [0.8, 0.1, -0.4]])
B8 = np.array([0.0, 0.04])
LIN = [np.array([0.2, 0.7]), np.array([0.1, 0.3, 0.5]), np.array([0.4, 0.4, 0.2]), np.array([0.9, 0.1]),
       np.array([0.25, 0.6])]


def tiny_lpips() -> M.LpipsNet:
    """An AlexNet-shaped feature stack (taps after layers 1, 4, 7, 9, 11) with fixed 1x1 convolutions."""
    nn = torch.nn

    def conv(w, b):
        c = nn.Conv2d(w.shape[1], w.shape[0], 1)
        with torch.no_grad():
            c.weight.copy_(torch.tensor(w, dtype=torch.float32)[:, :, None, None])
            c.bias.copy_(torch.tensor(b, dtype=torch.float32))
        return c

    layers = [conv(W0, B0), nn.ReLU(), nn.Identity(), conv(W3, B3), nn.ReLU(), nn.MaxPool2d(2), nn.Identity(),
              nn.Identity(), conv(W8, B8), nn.ReLU(), nn.Identity(), nn.Identity()]
    return M.LpipsNet(kind="alex", features=nn.Sequential(*layers).eval(),
                      lin=[torch.tensor(w, dtype=torch.float32) for w in LIN])


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """1-D bilinear interpolation weights, half-pixel centres (align_corners=False), edges clamped."""
    u = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        u[i, i0] += 1 - lam
        u[i, i1] += lam
    return u


def hand_lpips(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """LPIPS of two (H, W, 3) frames in [0, 255]: unit-normalised features per tap, squared difference
    weighted per channel, spatial mean summed over taps; the map sums the per-tap maps upsampled."""
    def feats(img):
        x = (img / 127.5 - 1.0 - SHIFT) / SCALE
        h0 = np.maximum(x @ W0.T + B0, 0)
        h1 = np.maximum(h0 @ W3.T + B3, 0)
        h, w, c = h1.shape
        pooled = h1.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))
        h3 = np.maximum(pooled @ W8.T + B8, 0)
        return [h0, h1, pooled, h3, h3]

    value, full = 0.0, np.zeros(a.shape[:2])
    for k, (fa, fb) in enumerate(zip(feats(a.astype(np.float64)), feats(b.astype(np.float64)))):
        na = fa / (np.sqrt((fa**2).sum(-1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt((fb**2).sum(-1, keepdims=True)) + 1e-10)
        layer = ((na - nb) ** 2 * LIN[k]).sum(-1)
        value += layer.mean()
        uy, ux = _upsample_matrix(layer.shape[0], a.shape[0]), _upsample_matrix(layer.shape[1], a.shape[1])
        full += uy @ layer @ ux.T
    return value, full


def test_lpips_values_and_maps_match_the_hand_computation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    values, maps = M.lpips_maps(tiny_lpips(), a, b)
    for i in range(2):
        value, full = hand_lpips(a[i], b[i])
        assert values[i] == pytest.approx(value, rel=1e-5)
        np.testing.assert_allclose(maps[i], full, rtol=1e-4, atol=1e-7)
    same, _ = M.lpips_maps(tiny_lpips(), a, a)
    assert np.all(same == 0)
    # the upsampling weights by hand for a 2 -> 4 upsample: [1, 0], [.75, .25], [.25, .75], [0, 1]
    np.testing.assert_allclose(_upsample_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])


class _Scorers:
    """The one optional scorer this test needs (LPIPS), the way run_eval asks for scorers."""

    device = "cpu"

    def __init__(self, net):
        self.net = net

    def describe(self):
        return {"lpips": "tiny", "clip": None, "pickscore": None, "vbench": None}

    def get(self, name):
        if name == "lpips":
            return self.net
        return {"available": False, "reason": "test", "how": "test"}


def _psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    sq = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if region is not None:
        sq = sq[region]
    return 10 * math.log10(255.0**2 / sq.mean())


def test_clip_level_averages_equal_independent_per_frame_loops(tmp_path):
    ws = make_workspace(tmp_path / "ws", frames=4, size=64, seed=2)
    src = ws.read("video/frames")
    mask = ws.read("masks/edit").astype(bool)
    rng = np.random.default_rng(1)
    recon = np.clip(src + rng.normal(0, 3 + np.arange(4)[:, None, None, None] * 2, src.shape), 0, 255)
    recon = recon.astype(np.uint8)
    edit = np.clip(src.astype(int) + rng.integers(-20, 21, src.shape), 0, 255).astype(np.uint8)
    edit[mask] = (200, 40, 40)
    ws.write_array("inversion/reconstruction", recon)
    ws.write_array("edits/red/frames", edit)
    ws.update_attrs("edits/red", prompt="a red disc", params={"background": False}, status="done")
    net = tiny_lpips()
    out = run_eval(ws, EvalConfig(metrics=["psnr", "lpips", "warp"]), scorers=_Scorers(net))["items"]

    rec = out["reconstruction"]["metrics"]
    want = {"psnr": [_psnr(src[f], recon[f]) for f in range(4)],
            "psnr_inside": [_psnr(src[f], recon[f], mask[f]) for f in range(4)],
            "psnr_outside": [_psnr(src[f], recon[f], ~mask[f]) for f in range(4)]}
    lp = [hand_lpips(src[f], recon[f]) for f in range(4)]
    want["lpips"] = [v for v, _ in lp]
    want["lpips_inside"] = [float(m[mask[f]].mean()) for f, (_, m) in enumerate(lp)]
    for key, per_frame in want.items():
        assert rec[key] == pytest.approx(float(np.mean(per_frame)), rel=1e-4), key
        assert out["reconstruction"]["per_frame"][key] == pytest.approx(per_frame, rel=1e-4), key

    red = out["red"]["metrics"]
    assert red["psnr_unedited"] == pytest.approx(np.mean([_psnr(src[f], edit[f], ~mask[f]) for f in range(4)]))
    fwd = [M.farneback_flow(src[f], src[f + 1]) for f in range(3)]  # flows of the SOURCE video
    bwd = [M.farneback_flow(src[f + 1], src[f]) for f in range(3)]
    loops = {"warp_error": [M.warp_error(edit[f], edit[f + 1], fwd[f], bwd[f]) for f in range(3)],
             "warp_error_edited": [M.warp_error(edit[f], edit[f + 1], fwd[f], bwd[f], mask[f]) for f in range(3)],
             "warp_error_source": [M.warp_error(src[f], src[f + 1], fwd[f], bwd[f]) for f in range(3)]}
    for key, per_pair in loops.items():
        finite = [v for v in per_pair if not math.isnan(v)]
        assert red[key] == pytest.approx(float(np.mean(finite)), rel=1e-6), key
    assert red["warp_error"] != pytest.approx(red["warp_error_source"])
