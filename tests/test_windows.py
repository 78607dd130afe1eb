"""Long clips through overlapping temporal windows: the plan, the blend weights, exactness with one window,
the windowed null-text gradient, and a 40-frame clip through mask -> invert (interrupted, resumed) -> edit -> eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_workspace
from stages.method.windows import Windows, blend, plan_windows
from vdcli.app import app

runner = CliRunner()
PROMPT = "a red disc on a textured wall"


def test_plan_covers_the_clip_deterministically():
    # stride W - O = 6 from 0; the last window is aligned to the end
    assert plan_windows(40, 8, 2).spans == ((0, 8), (6, 14), (12, 20), (18, 26), (24, 32), (30, 38), (32, 40))
    assert plan_windows(16, 16, 4).spans == ((0, 16),) and plan_windows(5, 16, 4).spans == ((0, 5),)
    assert plan_windows(20, 16, 4).spans == ((0, 16), (4, 20))
    assert plan_windows(40, 8, 2) == plan_windows(40, 8, 2)


def test_weights_sum_to_one_and_ramp_across_the_overlap():
    w = plan_windows(20, 8, 2)  # (0,8) (6,14) (12,20)
    weights = w.weights()
    total = np.zeros(20)
    for (s, e), row in zip(w.spans, weights):
        total[s:e] += row
    np.testing.assert_allclose(total, np.ones(20), rtol=0, atol=1e-12)
    # frames 0-5 only in window 0, 8-11 only in window 1: weight exactly 1
    assert weights[0][:6] == [1.0] * 6 and weights[1][2:6] == [1.0] * 4
    # overlap frames 6, 7: linear ramp 2/3, 1/3 out of window 0 and 1/3, 2/3 into window 1
    np.testing.assert_allclose(weights[0][6:], [2 / 3, 1 / 3])
    np.testing.assert_allclose(weights[1][:2], [1 / 3, 2 / 3])
    assert w.borders() == [6, 7, 12, 13]


def test_blend_mixes_per_frame_and_one_window_is_untouched():
    w = plan_windows(6, 4, 2)  # (0,4) (2,6): frames 2, 3 shared
    calls = []

    def run(s, e):
        calls.append((s, e))
        return torch.full((1, e - s, 2), float(s))  # window 0 says 0, window 1 says 2

    out = blend(w, run)
    # frame 2: 2/3 of window 0 (0) + 1/3 of window 1 (2); frame 3: 1/3 * 0 + 2/3 * 2
    np.testing.assert_allclose(out[0, :, 0].numpy(), [0, 0, 2 / 3, 4 / 3, 2, 2], atol=1e-6)
    assert calls == [(0, 4), (2, 6)]
    x = torch.randn(1, 3, 2)
    assert blend(plan_windows(3, 4, 1), lambda s, e: x) is x


def test_windowed_null_text_gradient_equals_the_whole_clip_gradient(tiny):
    """Two identical windows (weights 1/2 each) must reproduce the one-window loss and phi gradient."""
    from stages.method import ddim
    from stages.invert import Passes
    from stages.invert.nulltext import _null_text_backward_windowed

    F_ = 3
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, F_, 4, 8, 8, generator=g)
    target = torch.randn(1, F_, 4, 8, 8, generator=g) * 0.1 + z
    G = torch.randn(1, F_, 4, 8, 8, generator=g) * 0.01
    eps_c = torch.randn(1, F_, 4, 8, 8, generator=g)
    phi0 = torch.randn(F_, 77, 32, generator=g) * 0.1
    t, tp = 501, 481

    single = Passes(tiny, windows=None)
    phi_a = phi0.clone().requires_grad_(True)
    loss_a = torch.nn.functional.mse_loss(
        ddim.ddim_step(z, ddim.cfg(single.eps(z, t, phi_a), eps_c, 7.5), t, tp, guidance=G), target)
    loss_a.backward()

    twice = Passes(tiny, windows=Windows(F_, F_, 0, ((0, F_), (0, F_))))
    phi_b = phi0.clone().requires_grad_(True)
    loss_b = _null_text_backward_windowed(twice, z, t, tp, phi_b, eps_c, G, target, 7.5)
    torch.testing.assert_close(loss_b, loss_a.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(phi_b.grad, phi_a.grad, rtol=1e-4, atol=1e-9)
    assert twice.backwards == 2 and phi_a.grad.abs().sum() > 0


def vd(*args):
    return runner.invoke(app, [*map(str, args)])


@pytest.mark.parametrize("args,text", [
    (["--window", "40"], "--window must be in 1..32"),
    (["--window", "8", "--overlap", "8"], "--overlap must be in 0..7"),
    (["--window", "8", "--overlap", "-1"], "--overlap must be in 0..7"),
])
def test_bad_windows_are_refused_before_any_work(tmp_path, loads, args, text):
    ws = make_workspace(tmp_path / "ws")
    r = vd("invert", ws.path, "--prompt", PROMPT, "--model", "tiny", *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vd: error:") and text in lines[0], r.stderr
    assert loads == [] and not ws.has("inversion/done")


def test_window_as_large_as_the_clip_is_the_single_window_path(tmp_path, loads):
    a, b = make_workspace(tmp_path / "a"), make_workspace(tmp_path / "b")
    fast = ["--prompt", PROMPT, "--model", "tiny", "--steps", "2", "--null-steps", "1", "--device", "cpu", "-q"]
    assert vd("invert", a.path, *fast).exit_code == 0
    assert vd("invert", b.path, *fast, "--window", "4", "--overlap", "3").exit_code == 0
    for name in ("latents", "recon_latents", "null_embeddings", "stdg/guidance"):
        assert np.array_equal(a.read(f"inversion/{name}"), b.read(f"inversion/{name}")), name


def test_long_clip_through_every_stage_with_resume(tmp_path, loads, interrupt_invert):
    """40 frames in windows of 8 (overlap 2): mask -> invert (interrupted, resumed) -> edit -> eval."""
    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    video, _ = moving_disc(40, 64, 64, seed=2)
    write_mp4(tmp_path / "long.mp4", video, 8)
    r = vd("mask", tmp_path / "long.mp4", "--frames", "all", "--size", "64", "--box", "8,8,40,40", "--box-only",
           "-o", tmp_path / "long.vd", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["frames"] == 40
    ws_path = tmp_path / "long.vd"
    invert = ["invert", ws_path, "--prompt", PROMPT, "--subject", "red disc", "--model", "tiny", "--steps", "3",
              "--null-steps", "1", "--window", "8", "--overlap", "2", "--device", "cpu", "-q"]
    assert vd(*invert).exit_code == 130
    r = vd(*invert, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_from"] == 1

    from stages.io.workspace import Workspace

    ws = Workspace.open(ws_path)
    attrs = ws.group_attrs("inversion")
    assert attrs["windows"]["spans"][0] == [0, 8] and len(attrs["windows"]["spans"]) == 7
    assert ws.read("inversion/latents").shape[1] == 40
    assert ws.has("inversion/targets/w6/keys")  # STDG targets per window (step 1 of 3 runs STDG)
    assert np.abs(ws.read("inversion/stdg/guidance")[1]).max() > 0

    # a clean, uninterrupted run gives the same arrays
    import shutil

    clean = tmp_path / "clean.vd"
    shutil.copytree(ws_path, clean)
    clean_ws = Workspace.open(clean)
    r = vd(*[clean if a == ws_path else a for a in invert], "--restart")
    assert r.exit_code == 0, r.output
    for name in ("latents", "recon_latents", "null_embeddings", "stdg/guidance"):
        assert np.array_equal(ws.read(f"inversion/{name}"), clean_ws.read(f"inversion/{name}")), name

    r = vd("edit", ws_path, "--prompt", "blue cube", "--device", "cpu", "--json", "-q")
    assert r.exit_code == 0, r.output
    name = json.loads(r.stdout)["name"]
    assert ws.read(f"edits/{name}/frames").shape[0] == 40
    assert ws.group_attrs(f"edits/{name}")["stats"]["windows"]["spans"] == attrs["windows"]["spans"]
    r = vd("eval", ws_path, "--metrics", "warp", "--json", "-q")
    assert r.exit_code == 0, r.output
    items = json.loads(r.stdout)["items"]
    assert set(items) == {"reconstruction", name}
    for item in items.values():  # the seam metric appears whenever the inversion used windows
        assert {"warp_error_seam", "warp_error_inside"} <= set(item["metrics"]), item["metrics"]
