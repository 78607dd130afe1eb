"""`vd invert` through the CLI: JSON summary, presets, one-line errors, Ctrl-C and a killed process resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from conftest import make_workspace
from vdcli.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red disc on a textured wall"
FAST = ["--model", "tiny", "--steps", "3", "--null-steps", "1", "--device", "cpu"]
ARRAYS = ("latents", "recon_latents", "null_embeddings", "stdg/guidance")


def vd(*args) -> object:
    return runner.invoke(app, ["invert", *map(str, args)])


def one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vd: error: ") and text in lines[0], result.stderr


def test_background_preset_json_summary_and_outputs(tmp_path, loads):
    ws = make_workspace(tmp_path / "ws")
    r = vd(ws.path, "--prompt", PROMPT, "--subject", "red disc", "--preset", "background", *FAST,
           "--compare-ddim", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["steps"] == 3 and data["region"] == "background" and data["stdg"] == [0.5, 0.5, 0.5, 0.0]
    assert {"psnr", "psnr_fg", "psnr_bg", "latent_mse", "vae_psnr", "ddim_psnr"} <= set(data["recon"])
    assert data["counts"]["null_text_total"]["unet_gt_forwards"] == 1  # only the middle step runs STDG
    assert len(data["inner_iterations"]) == 3 and set(data["timings"]) >= {"null_text_s", "total_s"}
    attrs = ws.group_attrs("inversion")
    assert attrs["region"] == "background" and attrs["subject"] == "red disc" and attrs["status"] == "done"
    assert Path(data["outputs"]["preview.gif"]).is_file() and loads == ["tiny"]
    # rerunning with no flags at all reuses the stored settings: nothing left to do, no model loaded
    r = vd(ws.path, "--json", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["already_done"] and loads == ["tiny"] and r.stderr == ""
    # a different setting is refused by name; a different model too, before loading anything
    one_line_error(vd(ws.path, "--prompt", PROMPT, "--preset", "background", *FAST[:-2], "--cfg", "5"), 3,
                   "cfg 7.5 -> 5.0")
    one_line_error(vd(ws.path, "--model", "sd15-random"), 3, "model 'tiny' -> 'sd15-random'")
    one_line_error(vd(ws.path, "--preset", "foreground"), 3, "region 'background' -> 'foreground'")
    assert loads == ["tiny"]


def test_bad_inputs_give_one_line_errors(tmp_path, loads):
    ws = make_workspace(tmp_path / "ws")
    one_line_error(vd(ws.path, *FAST), 2, "--prompt is required")
    one_line_error(vd(ws.path, "--prompt", "  ", *FAST), 2, "must not be empty")
    one_line_error(vd(ws.path, "--prompt", PROMPT, "--preset", "no-such-preset"), 3, "unknown preset")
    one_line_error(vd(ws.path, "--prompt", PROMPT, "--stdg", "1,2"), 2, "--stdg")
    one_line_error(vd(ws.path, "--prompt", PROMPT, "--stdg", "1,1,1,1", "--no-stdg"), 2, "contradict")
    one_line_error(vd(ws.path, "--prompt", PROMPT, "--schedule", "linear"), 2, "--schedule")
    one_line_error(vd(tmp_path / "missing", "--prompt", PROMPT), 3, "not found")
    ws.remove("masks/edit")
    one_line_error(vd(ws.path, "--prompt", PROMPT, *FAST), 3, "no masks/edit")
    assert loads == []


def test_ctrl_c_exits_130_and_the_rerun_resumes(tmp_path, loads, interrupt_invert):
    ws = make_workspace(tmp_path / "ws")
    one_line_error(vd(ws.path, "--prompt", PROMPT, *FAST, "-q"), 130, "rerun the same command to resume")
    assert ws.read("inversion/done").tolist() == [True, False, False, False]
    r = vd(ws.path, "--prompt", PROMPT, *FAST, "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_from"] == 1 and ws.read("inversion/done").all()


def _done(path: Path) -> np.ndarray | None:
    try:
        return zarr.open_array(str(path / "inversion/done"), mode="r")[...]
    except Exception:  # not created yet
        return None


def test_killed_process_resumes_to_the_result_of_an_uninterrupted_run(tmp_path, loads):
    ws = make_workspace(tmp_path / "killed")
    env = dict(os.environ, VD_TEST_STEP_DELAY="120", OMP_NUM_THREADS=str(torch.get_num_threads()),
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "vdcli.app", "invert", str(ws.path), "--prompt", PROMPT, *FAST,
                             "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            done = _done(ws.path)
            if done is not None and done[0]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup at all: only committed steps survive
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ws.read("inversion/done").tolist() == [True, False, False, False]
    assert ws.group_attrs("inversion")["status"] == "running"

    r = vd(ws.path, "--prompt", PROMPT, *FAST, "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_from"] == 1

    ref = make_workspace(tmp_path / "uninterrupted")
    r = vd(ref.path, "--prompt", PROMPT, *FAST, "-q")
    assert r.exit_code == 0, r.output
    for name in ARRAYS:
        assert np.array_equal(ws.read(f"inversion/{name}"), ref.read(f"inversion/{name}")), name
