"""The user's path: weights on disk in the formats people have, every stage a separate `vd` process.

For each format, `vd invert` (killed after its first step, then resumed) -> `vd edit` -> `vd eval` run as
separate processes with different PYTHONHASHSEEDs, and each stage must accept the others' work. `-q` runs
must leave stderr empty.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import model_files
from stages.io.synthetic import moving_disc

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red disc on a textured wall"
INVERT = ["--prompt", PROMPT, "--subject", "red disc", "--steps", "3", "--null-steps", "1", "--device", "cpu"]


def _env(seed: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VD_")}
    env.update(PYTHONHASHSEED=str(seed), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", **extra)
    return env


def vd(env: dict[str, str], *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdcli.app", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, tuple[str, dict[str, str]]]:
    """format name -> (--model value, extra environment) for the tiny weights written three ways."""
    root = tmp_path_factory.mktemp("weights")
    parts = model_files.tiny_parts()
    legacy = model_files.write_legacy_folder(root / "sd15-legacy", parts)
    adapter = model_files.write_adapter_folder(root / "adapter", parts)
    ckpt = model_files.write_original_motion_module(root / "v3_tiny_mm.ckpt", parts)
    single = model_files.write_single_file(root / "tinyVision.safetensors", parts)
    configs = model_files.write_config_folder(root / "configs", parts)
    return {
        "legacy-folder": (str(legacy), {"VD_MOTION_ADAPTER": str(adapter)}),
        "original-ckpt": (str(legacy), {"VD_MOTION_ADAPTER": str(ckpt)}),
        "single-file": (str(single), {"VD_MOTION_ADAPTER": str(ckpt), "VD_SD15_CONFIG": str(configs)}),
    }


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> Path:
    """A workspace made by `vd mask` in its own process from a generated mp4."""
    from stages.io.video import write_mp4

    root = tmp_path_factory.mktemp("clip")
    video, _ = moving_disc(4, 64, 64, seed=3)
    write_mp4(root / "clip.mp4", video, 8)
    r = vd(_env(11), "mask", root / "clip.mp4", "--frames", "4", "--size", "64", "--box", "8,8,40,40",
           "--box-only", "-o", root / "clip.vd", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return root / "clip.vd"


def _done(ws: Path) -> np.ndarray | None:
    try:
        return zarr.open_array(str(ws / "inversion" / "done"), mode="r")[...]
    except Exception:  # not created yet
        return None


def _invert_killed_after_first_step(env: dict[str, str], ws: Path, model: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "vdcli.app", "invert", str(ws), "--model", model, *INVERT, "-q"],
                            cwd=ROOT, env={**env, "VD_TEST_STEP_DELAY": "120"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = _done(ws)
            if done is not None and done[0]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _done(ws).tolist() == [True, False, False, False]


@pytest.mark.parametrize("fmt", ["legacy-folder", "original-ckpt", "single-file"])
def test_stages_accept_each_others_work_across_processes(fmt, formats, masked, tmp_path):
    model, extra = formats[fmt]
    ws = tmp_path / "ws.vd"
    shutil.copytree(masked, ws)

    _invert_killed_after_first_step(_env(1, **extra), ws, model)
    r = vd(_env(2, **extra), "invert", ws, "--model", model, *INVERT, "--json", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from"] == 1
    assert r.stderr == ""  # -q: nothing but errors, and there were none

    r = vd(_env(3, **extra), "edit", ws, "--prompt", "blue cube", "--device", "cpu", "--json", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    edit = json.loads(r.stdout)
    assert edit["frames"][0] == 4

    r = vd(_env(4, **extra), "eval", ws, "--json", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""

    if fmt != "legacy-folder":  # the rest is the same for every format; one process less each
        return
    # without -q only vd's own lines reach stderr (no library log lines or their progress bars)
    r = vd(_env(5, **extra), "edit", ws, "--prompt", "green ball", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for noise in ("accelerate", "Defaulting to unsafe", "An error occurred", "Loading weights", "Warning"):
        assert noise not in r.stderr, r.stderr
