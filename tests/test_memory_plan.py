"""Planning for a GPU not at hand: `vd invert/edit --dry-run --plan-for`, `--frames/--size` without a workspace,
the method's own passes, CPU autocast, and the helpers in stages.models.memory behind the card table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_workspace
from stages.common.errors import UsageError
from stages.invert import InvertConfig
from stages.invert.plan import parse_target, plan_inputs, plan_invert
from stages.models import memory
from vdcli.app import app

GIB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent
# the stated coefficients (stages/models/memory.py, bench/RESULTS.md: grad passes 2026-12-06, the others
# 2026-12-03), copied so that a refit of the table does not change what these tests compute by hand; at 512 px
# r = 1, so the exponents do not matter
STATED_WEIGHTS = {"unet": 1277221764, "vae": 83653863, "text": 123060480}
# on a GPU: the UNet in bf16 (2,554,443,528 bytes) in every pass, the VAE in float32 only in the VAE passes (the
# text encoder waits in host memory)
W_BF16 = 1277221764 * 2
W_VAE = W_BF16 + 83653863 * 4
STATED = {
    "ddim": {"const": 238080, "const_exp": 0.0, "per_frame": 74688000, "per_frame_exp": 1.0},
    "edit": {"const": 241920, "const_exp": 0.0, "per_frame": 288247991, "per_frame_exp": 1.0},
    "null_text": {"const": 1385472, "const_exp": 0.0, "per_frame": 1677070555, "per_frame_exp": 1.0},
    "null_text+blocks": {"const": 331776, "const_exp": 0.0, "per_frame": 655817216, "per_frame_exp": 1.0},
    "null_text+layers": {"const": 249856, "const_exp": 0.0, "per_frame": 206600704, "per_frame_exp": 1.0},
    "stdg": {"const": -534528, "const_exp": 1.0, "per_frame": 1182828178, "per_frame_exp": 1.0},
    "stdg+blocks": {"const": 299520, "const_exp": 0.0, "per_frame": 392425984, "per_frame_exp": 1.0},
    "stdg+layers": {"const": 251904, "const_exp": 0.0, "per_frame": 131625472, "per_frame_exp": 1.0},
    "vae_decode": {"const": 804888064, "const_exp": 1.0, "per_clip_frame": 5591771, "per_clip_frame_exp": 1.0,
                   "chunk": 1},
    "vae_encode": {"const": 237056, "const_exp": 0.0, "per_frame": 670957568, "per_frame_exp": 1.0,
                   "per_clip_frame": 7183360, "per_clip_frame_exp": 1.0, "chunk": 4},
}
runner = CliRunner()


@pytest.fixture
def stated(monkeypatch):
    monkeypatch.setattr(memory, "COEFFICIENTS", {"bf16": STATED, "fp32": STATED})
    monkeypatch.setattr(memory, "WEIGHT_ELEMENTS", STATED_WEIGHTS)


def plan(target: str | None = "12GB", frames: int = 16, size: int = 512, **cfg):
    return plan_invert(None, InvertConfig(prompt="a bear", **cfg), parse_target(target) if target else None, frames,
                       (size, size))


def test_card_sizes_and_the_cuda_context_allowance():
    t = parse_target("12GB")
    assert (t.name, t.total, t.usable) == ("12GB", 12 * GIB, 12 * GIB - GIB // 2)
    assert [c for c, _ in t.cards] == ["RTX 3060 12GB", "RTX 4070"]
    assert parse_target(" 24gb ").total == 24 * GIB and parse_target("80GB").cards[-1][0] == "H100 SXM"
    odd = parse_target("10.5GiB")
    assert (odd.name, odd.total, odd.usable, odd.cards) == ("10.5GiB", int(10.5 * GIB), int(10.5 * GIB) - GIB // 2, ())
    for bad in ("12TB", "twelve", "0.5GB", "-4GB", ""):
        with pytest.raises(UsageError, match="--plan-for"):
            parse_target(bad)


def test_null_text_16x512_bf16_fits_12gb_with_layers(stated):
    # auto: the grad passes without checkpointing need null_text off = W + 1,385,472 + 16 x 1,677,070,555
    need_off = W_BF16 + 1385472 + 16 * 1677070555
    assert need_off == 29388957880
    # blocks: null text W + 331,776 + 16 x 655,817,216 = 13,047,850,760 (12.15 GiB) is the largest pass
    blocks = W_BF16 + 331776 + 16 * 655817216
    # layers: null text W + 249,856 + 16 x 206,600,704 = 5,860,304,648 (5.46 GiB), above the VAE encode's
    # W_VAE + 237,056 + 4 x 670,957,568 + 16 x 7,183,360 = 5,688,060,068
    layers = W_BF16 + 249856 + 16 * 206600704
    encode = W_VAE + 237056 + 4 * 670957568 + 16 * 7183360
    assert (blocks, layers, encode) == (13047850760, 5860304648, 5688060068)
    r = plan("12GB")
    assert (r["device"], r["dtype"], r["memory"]["model_dtype"]) == ("cuda", "bf16", "bf16")
    assert r["memory"]["peak"] == {"off": need_off, "blocks": blocks, "layers": layers}
    assert r["memory"]["passes"]["vae_encode"] == {"off": encode}
    ck = r["memory"]["checkpointing"]
    assert (ck["mode"], ck["need"], ck["available"]) == ("layers", need_off, 12 * GIB - GIB // 2)
    v = r["verdict"]
    assert v["fits"] is True and v["level"] == "layers" and v["margin"] == 12348030976 - 5860304648
    sixteen = plan("16GB")  # blocks fits 15.5 GiB: auto takes it (the first level that fits)
    assert sixteen["memory"]["checkpointing"]["mode"] == "blocks"
    assert sixteen["verdict"]["fits"] is True and sixteen["verdict"]["margin"] == 16 * GIB - GIB // 2 - blocks
    big = plan("80GB")
    assert big["memory"]["checkpointing"]["mode"] == "off" and big["verdict"]["peak"] == need_off


def test_what_does_not_fit_names_what_would(stated):
    # --checkpointing off on a 12 GB card: the levels that fit come first, then shorter windows
    off = plan("12GB", checkpointing="off")
    v = off["verdict"]
    assert v["fits"] is False and v["suggestion"] == "--checkpointing layers" and "about 5.5 GiB" in v["text"]
    # 4 GB (3.5 GiB usable): even one window of 4 frames with layers needs the whole clip's VAE encode (5.3 GiB)
    tiny_card = plan("4GB")["verdict"]
    assert tiny_card["fits"] is False and tiny_card["suggestion"] == "a smaller `vd mask --size`"
    # 32 frames in one window at 512 px: layers W + 249,856 + 32 x 206,600,704 = 9,165,915,912 (8.5 GiB)
    thirty_two = plan("12GB", frames=32, window=32)
    assert thirty_two["memory"]["peak"]["layers"] == W_BF16 + 249856 + 32 * 206600704 == 9165915912
    assert thirty_two["verdict"]["fits"] is True


def test_direct_inversion_has_no_backward_pass_and_two_forwards_per_step(stated):
    r = plan("12GB", method="direct")
    assert r["passes"] == ["vae_encode", "ddim", "vae_decode"] and "null_text" not in r["memory"]["passes"]
    encode = W_VAE + 237056 + 4 * 670957568 + 16 * 7183360  # chunks of 4 frames + the whole clip's inputs
    assert r["memory"]["peak"] == {"off": encode, "blocks": encode, "layers": encode} and r["verdict"]["fits"] is True
    assert "no backward pass" in r["memory"]["checkpointing"]["reason"]
    assert r["time"]["forward_equivalents_per_step"] == 2.0 and r["null_steps"] == 0
    null = plan("12GB")
    assert null["time"]["forward_equivalents_per_step"] == 34.1  # 10 x (1 + 1.2 + 0.75) + 1 + (0.7 + 1 + 1.2 + 0.7)
    assert plan("80GB")["time"]["forward_equivalents_per_step"] == 25.9  # no recomputation: 10 x 2.2 + 1 + 2.9


def test_negative_prompt_runs_stdg_but_no_null_text_iterations(stated):
    r = plan("80GB", method="negative-prompt")
    assert r["passes"] == ["vae_encode", "ddim", "stdg", "vae_decode"]
    assert r["time"]["forward_equivalents_per_step"] == 3.9  # GT 0.7 + grad fwd 1 + bwd 1.2 + final eps_u 1
    assert r["memory"]["peak"]["off"] == W_BF16 - 534528 + 16 * 1182828178
    no_stdg = plan("80GB", method="negative-prompt", use_stdg=False)
    assert no_stdg["passes"] == ["vae_encode", "ddim", "vae_decode"]
    assert no_stdg["time"]["forward_equivalents_per_step"] == 2.0


def test_time_estimate_per_card_of_the_class(stated):
    r = plan("80GB")
    # 16 frames x 1.1 TFLOP = 17.6 TFLOP per forward-equivalent; A100 80GB: 312 TFLOP/s x 0.23 = 71.76 effective
    a100, h100 = r["time"]["cards"]
    assert a100["card"] == "A100 80GB" and a100["seconds_per_step"] == pytest.approx(25.9 * 17.6 / 71.76)
    assert h100["seconds_per_step"] == pytest.approx(25.9 * 17.6 / (989 * 0.23))
    # the whole run: S middle steps plus S DDIM-inversion forwards
    assert a100["seconds_total"] == pytest.approx(50 * (25.9 + 1) * 17.6 / 71.76)
    assert r["time"]["seconds_per_step"] == a100["seconds_per_step"] and r["time"]["estimate"] is True
    assert plan("20GiB")["time"]["seconds_per_step"] is None  # no card class: memory only
    fp32 = plan("24GB", dtype="fp32")
    assert fp32["dtype"] == "fp32" and fp32["time"]["seconds_per_step"] is None
    fp16 = plan("24GB", dtype="fp16")
    assert (fp16["dtype"], fp16["memory"]["model_dtype"]) == ("fp16", "bf16")


def test_bf16_on_the_cpu_plans_cpu_autocast(stated):
    r = plan(None, device="cpu", dtype="bf16")
    assert (r["device"], r["dtype"], r["memory"]["model_dtype"]) == ("cpu", "bf16", "bf16-cpu")
    w_cpu = (1277221764 + 83653863 + 123060480) * 4  # the UNet stays float32 on the CPU; all three resident
    copies = 1277221764 * 2  # autocast's bf16 casts of the UNet weights, kept for the backward
    assert r["memory"]["passes"]["null_text"]["off"] == w_cpu + copies + 1385472 + 16 * 1677070555
    assert r["memory"]["passes"]["ddim"]["off"] == w_cpu + 238080 + 16 * 74688000  # no grad: no copies kept
    assert plan(None, device="cpu")["memory"]["model_dtype"] == "fp32"


def test_plan_inputs_and_the_missing_workspace():
    assert plan_inputs(False, True, "16GB", 24, "768x512")[1:] == (24, (512, 768))
    with pytest.raises(UsageError, match="Missing argument 'WS'"):
        plan_inputs(False, False)
    with pytest.raises(UsageError, match="Missing argument 'WS'"):
        plan_inputs(False, True, "12GB", 16, None)
    with pytest.raises(UsageError, match="--plan-for applies to a dry run only"):
        plan_inputs(True, False, "12GB")
    with pytest.raises(UsageError, match="--frames"):
        plan_inputs(False, True, None, 0, "512")
    with pytest.raises(UsageError, match="--size"):
        plan_inputs(False, True, None, 16, "500")


def test_memory_helpers_behind_the_card_table(stated):
    passes = ("vae_encode", "ddim", "stdg", "null_text", "vae_decode")
    rows = memory.predict_passes(passes, 24, 512, 512, "bf16", window=16)
    assert set(rows["ddim"]) == {"off"} and set(rows["null_text"]) == {"off", "blocks", "layers"}
    assert rows["vae_encode"]["off"] == W_VAE + 237056 + 4 * 670957568 + 24 * 7183360  # the whole clip
    state = 52 * 4 * 4096 * 4 + 77 * 768 * 4 + 512 * 512  # per frame outside the window (memory.clip_state_bytes)
    assert rows["stdg"]["blocks"] == W_BF16 + 299520 + 16 * 392425984 + 8 * state  # one window of 16
    # 11.5 GiB with blocks: 12,348,030,976 >= W + 331,776 + n x 655,817,216 (null text) for n <= 14
    assert memory.largest_window(passes, 512, 512, 12 * GIB - GIB // 2, "bf16", "blocks") == 14
    # with layers null text fits all 32 frames (W + 249,856 + 32 x 206,600,704 = 9.17e9), and so does the VAE
    # encode of a 32-frame clip (W_VAE + 237,056 + 4 x 670,957,568 + 32 x 7,183,360 = 5.80e9)
    assert memory.largest_window(passes, 512, 512, 12 * GIB - GIB // 2, "bf16", "layers") == 32
    assert memory.largest_window(passes, 512, 512, 2 * GIB, "bf16", "layers") == 0


def test_cli_with_a_workspace_and_for_edit(tmp_path, stated):
    ws = make_workspace(tmp_path / "ws", frames=4, size=64)
    r = runner.invoke(app, ["invert", str(ws.path), "--dry-run", "--plan-for", "24GB", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["frames"], data["height"], data["workspace"], data["device"]) == (4, 64, str(ws.path), "cuda")
    over = json.loads(runner.invoke(app, ["invert", str(ws.path), "--dry-run", "--plan-for", "24GB", "--frames", "16",
                                          "--size", "512", "--json"]).stdout)
    assert (over["frames"], over["width"]) == (16, 512) and not ws.has("inversion")
    ws.update_attrs("inversion", steps=10, model={"spec": "sd15-random"},
                    windows={"window": 8, "overlap": 2, "spans": [[0, 4]]})
    e = runner.invoke(app, ["edit", str(ws.path), "--dry-run", "--plan-for", "12GB", "--frames", "16", "--size", "512",
                            "--json"])
    assert e.exit_code == 0, e.output
    edit = json.loads(e.stdout)
    assert (edit["steps"], edit["window"], edit["windows"], edit["frames_per_call"]) == (10, 8, 3, 8)
    # windows of 8, plus the state of the other 8 frames at 10 steps: 12 latents, an embedding and the mask
    state = 8 * (12 * 4 * 4096 * 4 + 77 * 768 * 4 + 512 * 512)
    assert edit["memory"]["passes"]["edit"]["off"] == W_BF16 + 241920 + 8 * 288247991 + state
    assert edit["time"]["forward_equivalents_per_step"] == 4.0 and edit["verdict"]["fits"] is True
    text = runner.invoke(app, ["edit", "--dry-run", "--plan-for", "12GB", "--frames", "16", "--size", "512",
                               "--first-frame", str(tmp_path / "x.png")])
    assert text.exit_code == 0 and "fits a 12GB card" in text.stdout and "SparseCtrl" in text.stdout
    bad = runner.invoke(app, ["edit", str(ws.path), "--prompt", "x", "--plan-for", "12GB"])
    assert bad.exit_code == 2 and "add --dry-run" in bad.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_a_gpu_points_at_plan_for(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    r = runner.invoke(app, ["invert", str(ws.path), "--prompt", "a disc", "--dry-run", "--device", "cuda"])
    assert r.exit_code == 2 and "--plan-for" in r.stderr and "no CUDA GPU" in r.stderr


def test_cli_plan_for_12gb_across_processes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    vd = [sys.executable, "-m", "vdcli"] if not (ROOT / ".venv/bin/vd").exists() else [str(ROOT / ".venv/bin/vd")]
    out = subprocess.run([*vd, "invert", "--dry-run", "--plan-for", "12GB", "--frames", "16", "--size", "512",
                          "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["device"], data["dtype"], data["workspace"], data["frames"]) == ("cuda", "bf16", None, 16)
    peak = data["memory"]["peak"]
    assert set(peak) == set(memory.LEVELS)
    assert peak["layers"] == memory.predict_stage_peak("invert", 16, 512, 512, "bf16", "layers")
    assert data["target"]["bytes"] == 12 * GIB and data["target"]["usable_bytes"] == 12 * GIB - GIB // 2
    assert data["memory"]["checkpointing"]["mode"] == "layers" and data["time"]["cards"]
    assert data["verdict"]["fits"] is True and data["verdict"]["peak"] == peak["layers"] <= 12 * GIB - GIB // 2
    missing = subprocess.run([*vd, "invert"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("vd: error: Missing argument 'WS'")


def test_bench_gpu_arguments_and_card_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vd_bench_gpu", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    a = gpu.parse_args([])
    assert (a.model, a.frames, a.px, a.dtype, a.device) == ("sd15-random", 16, 512, "bf16", "cuda")
    assert a.runs == ["off", "blocks", "layers", "off"] and a.budget_s < 480  # the repeat of `off`: noise floor
    assert gpu.parse_args(["--levels", "blocks,auto", "--no-repeat"]).runs == ["blocks", "auto"]
    for bad in (["--levels", "fine"], ["--px", "500"], ["--steps", "1"]):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)
    spec = importlib.util.spec_from_file_location("vd_card_table", ROOT / "bench" / "card_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    cell = table.compute()["null-text inversion (the default, STDG on)"][12]["512x512"]
    passes = table.STAGES["null-text inversion (the default, STDG on)"]
    assert cell == {level: memory.largest_window(passes, 512, 512, 12 * GIB - GIB // 2, "bf16", level)
                    for level in memory.LEVELS}
    assert 0 < cell["off"] <= cell["blocks"] <= cell["layers"] <= 32
