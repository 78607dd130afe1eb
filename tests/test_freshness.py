"""One freshness rule (docs/concepts/freshness.md): every stage records the digests of exactly what it read, and
a result whose inputs changed is stale everywhere: `vd info` and `--check` show it, `vd edit` and `vd eval`
refuse to build on or score it, and `vd invert --restart` keeps the stored settings. Faults are caused (masks
rewritten, weights replaced with the old mtime restored, a weights file moved), never mocked.

Tiny model, 4 frames of 64 px, 2-3 steps. The model-file cases run `vd` in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import model_files
from conftest import make_workspace
from vdcli.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
SOURCE = "A brown bear, walking on rocky terrain, next to a stone wall."
FAST = ["--model", "tiny", "--steps", "2", "--null-steps", "1", "--device", "cpu"]


def vd(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output)
    return result.stdout


def one_line_error(result, code: int, *texts: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vd: error: "), result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def info(ws) -> dict:
    return json.loads(ok(vd("info", ws.path, "--check", "--json")))


def edit_entry(data: dict, name: str) -> dict:
    return next(e for e in data["edits"] if e["name"] == name)


def shifted(mask: np.ndarray, px: int = 8) -> np.ndarray:
    return np.roll(mask, px, axis=2)


def rewrite_masks(ws) -> None:
    """What a re-run of `vd mask` with another box leaves: other masks, same frames."""
    for name in ("masks/raw", "masks/edit"):
        ws.write_array(name, shifted(ws.read(name)))


# ----------------------------------------------------------------------------------------- masks
def test_changed_mask_with_stdg_off_makes_the_edit_stale_not_the_inversion(tmp_path, loads):
    from stages.edit import EditConfig, is_current as edit_current
    from stages.invert import is_current as invert_current, resolve_config

    ws = make_workspace(tmp_path / "ws")
    ok(vd("invert", ws.path, "--prompt", SOURCE, "--subject", "brown bear", "--no-stdg", *FAST, "-q"))
    ok(vd("edit", ws.path, "--prompt", "tiger", "-q"))
    ok(vd("edit", ws.path, "--prompt", "wolf", "--no-sa2", "-q"))  # reads no mask
    data = info(ws)
    assert "stale" not in edit_entry(data, "tiger") and data["check"]["stale"] == []
    rewrite_masks(ws)

    assert invert_current(ws, resolve_config(ws, {})) == (True, "")  # STDG off: the inversion read no mask
    fresh, why = edit_current(ws, EditConfig(prompt="tiger"))
    assert not fresh and "masks/edit" in why
    assert edit_current(ws, EditConfig(prompt="wolf", sa2=False)) == (True, "")
    data = info(ws)
    assert "masks/edit" in edit_entry(data, "tiger")["stale"] and "stale" not in edit_entry(data, "wolf")
    assert "stale" not in data["inversion"]
    assert [s["name"] for s in data["check"]["stale"]] == ["edits/tiger"]
    assert "vd edit" in data["check"]["stale"][0]["fix"]
    human = ok(vd("info", ws.path, "--check"))
    assert "tiger: done, STALE" in human and "stale    edits/tiger" in human
    one_line_error(vd("eval", ws.path, "--edit", "tiger", "-m", "psnr"), 3, "'tiger'", "stale", "vd edit")
    one_line_error(vd("eval", ws.path, "-m", "psnr"), 3, "'tiger'", "stale")
    ok(vd("eval", ws.path, "--edit", "wolf", "-m", "psnr", "-q"))
    ok(vd("edit", ws.path, "--prompt", "tiger", "--force", "-q"))  # redone: current again
    assert "stale" not in edit_entry(info(ws), "tiger")


def test_changed_mask_with_stdg_on_makes_the_inversion_stale_and_edit_refuses_it(tmp_path, loads):
    ws = make_workspace(tmp_path / "ws")
    ok(vd("invert", ws.path, "--prompt", SOURCE, "--subject", "brown bear", *FAST, "-q"))
    ok(vd("edit", ws.path, "--prompt", "tiger", "--no-sa2", "-q"))  # reads no mask itself
    rewrite_masks(ws)
    data = info(ws)
    assert "masks/edit" in data["inversion"]["stale"]
    assert "inversion" in edit_entry(data, "tiger")["stale"]  # built on a stale inversion
    assert {s["name"] for s in data["check"]["stale"]} == {"inversion", "edits/tiger"}
    line = next(ln for ln in ok(vd("info", ws.path)).splitlines() if ln.startswith("inversion"))
    assert "STALE" in line and "masks/edit" in line
    one_line_error(vd("edit", ws.path, "--prompt", "wolf"), 3, "stale", "vd invert", "--restart")
    one_line_error(vd("eval", ws.path, "--edit", "reconstruction", "-m", "psnr"), 3, "stale", "--restart")
    ok(vd("invert", ws.path, "--restart", "-q"))
    ok(vd("edit", ws.path, "--prompt", "wolf", "-q"))


def test_region_edit_is_stale_when_an_object_mask_changes(tmp_path, tiny):
    from stages.edit import EditConfig, is_current as edit_current, run_edit
    from stages.invert import InvertConfig, run_invert
    from stages.common.progress import Progress

    bear = np.zeros((4, 64, 64), np.uint8)
    bear[:, :, :24] = 1
    wall = np.zeros((4, 64, 64), np.uint8)
    wall[:, :, 40:] = 1
    ws = make_workspace(tmp_path / "ws", objects={"bear": (bear, "brown bear"), "wall": (wall, "stone wall")})
    run_invert(ws, InvertConfig(prompt=SOURCE, model="tiny", steps=2, null_steps=1, use_stdg=False, device="cpu"),
               Progress(quiet=True), models=tiny)
    cfg = EditConfig(prompt="", regions={"bear": "tiger"}, name="r")
    run_edit(ws, cfg, models=tiny)
    assert edit_current(ws, cfg) == (True, "")
    ws.write_array("masks/objects/wall/edit", shifted(wall))  # another object's mask: the layout reads it too
    fresh, why = edit_current(ws, cfg)
    assert not fresh and "masks/objects/wall/edit" in why


# ----------------------------------------------------------------------------------------- reruns
def test_restart_keeps_stored_settings_and_makes_old_edits_stale(tmp_path, loads):
    ws = make_workspace(tmp_path / "ws")
    ok(vd("invert", ws.path, "--prompt", SOURCE, "--subject", "brown bear", *FAST, "-q"))
    ok(vd("edit", ws.path, "--prompt", "tiger", "-q"))
    ok(vd("eval", ws.path, "-m", "psnr", "-q"))
    before = ws.group_attrs("inversion")["config"]
    loads.clear()
    ok(vd("invert", ws.path, "--restart", "-q"))  # no flags: every stored setting kept
    assert loads == ["tiny"]
    after = ws.group_attrs("inversion")["config"]
    assert {k: after[k] for k in ("prompt", "subject", "model", "steps", "null_steps")} == \
           {k: before[k] for k in ("prompt", "subject", "model", "steps", "null_steps")}
    data = info(ws)
    assert "another inversion" in edit_entry(data, "tiger")["stale"]
    stale = {s["name"] for s in data["check"]["stale"]}
    assert {"edits/tiger", "eval/tiger"} <= stale and "inversion" not in stale  # its scores are stale too
    one_line_error(vd("eval", ws.path, "-m", "psnr"), 3, "'tiger'", "stale", "vd edit")
    # another method: the old (null-text) edit must not be scored as a direct one
    ok(vd("invert", ws.path, "--restart", "--method", "direct", "-q"))
    assert ws.group_attrs("inversion")["config"]["steps"] == 2
    one_line_error(vd("eval", ws.path, "--compare", "-m", "psnr"), 3, "'tiger'", "stale")
    ok(vd("edit", ws.path, "--prompt", "tiger", "--force", "-q"))
    ok(vd("eval", ws.path, "--compare", "-m", "psnr", "-q"))


def test_subject_flag_updates_a_complete_inversion_and_stales_the_edits_that_used_it(tmp_path, loads):
    ws = make_workspace(tmp_path / "ws")
    ok(vd("invert", ws.path, "--prompt", SOURCE, "--subject", "brown bear", *FAST, "-q"))
    ok(vd("edit", ws.path, "--prompt", "tiger", "-q"))  # replaces the subject
    ok(vd("edit", ws.path, "--prompt", "A lion, walking on rocky terrain, next to a stone wall.", "-q"))  # full
    latents = ws.read("inversion/latents")
    loads.clear()
    r = vd("invert", ws.path, "--subject", "bear")
    ok(r)
    assert loads == []  # no model: the inversion itself is unchanged
    assert "subject 'brown bear' -> 'bear'" in r.stderr  # said, not silently ignored
    attrs = ws.group_attrs("inversion")
    assert attrs["subject"] == "bear" and attrs["config"]["subject"] == "bear"
    assert np.array_equal(ws.read("inversion/latents"), latents)
    data = info(ws)
    assert "stale" not in data["inversion"]
    assert "subject" in edit_entry(data, "tiger")["stale"] and "stale" not in edit_entry(data, "lion")
    one_line_error(vd("eval", ws.path, "--edit", "tiger", "-m", "psnr"), 3, "stale")
    ok(vd("eval", ws.path, "--edit", "lion", "-m", "psnr", "-q"))
    r = vd("edit", ws.path, "--prompt", "tiger", "--force", "--json", "-q")
    assert json.loads(ok(r))["resolved_prompt"] == SOURCE.replace("bear", "tiger")  # "A brown tiger, ..."


# ----------------------------------------------------------------------------------------- model files
def run_vd(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdcli.app", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """A single-file checkpoint (configs from a diffusers folder), a motion adapter folder, and a workspace
    inverted from the checkpoint by a `vd invert` process."""
    folder = tmp_path_factory.mktemp("model")
    parts = model_files.tiny_parts()
    model_files.write_config_folder(folder / "configs", parts)
    model_files.write_adapter_folder(folder / "adapter", parts)
    (folder / "x").mkdir()
    model_files.write_single_file(folder / "x" / "model.safetensors", parts)
    env = dict(os.environ, VD_MOTION_ADAPTER=str(folder / "adapter"), VD_SD15_CONFIG=str(folder / "configs"),
               XDG_CACHE_HOME=str(folder / "cache"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ws = make_workspace(folder / "ws")
    r = run_vd(env, "invert", ws.path, "--prompt", SOURCE, "--model", folder / "x" / "model.safetensors",
               "--steps", "2", "--null-steps", "1", "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    return folder, env, ws.path


@pytest.fixture
def copied(on_disk, tmp_path):
    """A copy of the inverted workspace; the weights file is restored (content and mtime) afterwards."""
    folder, env, ws = on_disk
    model = folder / "x" / "model.safetensors"
    original, stat = model.read_bytes(), model.stat()
    shutil.copytree(ws, tmp_path / "ws")
    from stages.io.workspace import Workspace

    yield env, Workspace.open(tmp_path / "ws"), model
    for leftover in (tmp_path / "y" / "renamed.safetensors",):
        if leftover.exists():
            leftover.unlink()
    model.write_bytes(original)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_changed_weights_on_a_complete_inversion_are_reported_not_already_complete(copied):
    from safetensors.torch import load_file, save_file

    env, ws, model = copied  # complete: a rerun says "already complete" (test_moved_weights_...)
    stat = model.stat()
    state = load_file(str(model))
    keys = sorted(k for k in state if "diffusion_model" in k)
    key = keys[len(keys) // 2]
    state[key] = state[key] + 0.01  # as a merged LoRA changes a middle layer: same size, other bytes
    tmp = model.with_name("new.safetensors")
    save_file(state, str(tmp))
    os.replace(tmp, model)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old mtime restored
    assert model.stat().st_size == stat.st_size and model.stat().st_mtime_ns == stat.st_mtime_ns
    r = run_vd(env, "invert", ws.path)
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "already complete" not in r.stderr and "model" in r.stderr and "changed" in r.stderr
    assert "--restart" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_moved_weights_with_the_same_content_are_the_same_model(copied, tmp_path, monkeypatch):
    env, ws, model = copied
    for var in ("VD_MOTION_ADAPTER", "VD_SD15_CONFIG", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, env[var])
    moved = tmp_path / "y" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.copy2(model, moved)
    model.unlink()
    hash_before = ws.group_attrs("inversion")["config_hash"]
    r = run_vd(env, "invert", ws.path, "--model", moved)
    assert r.returncode == 0, r.stderr
    assert "already complete" in r.stderr
    attrs = ws.group_attrs("inversion")
    assert attrs["model"]["spec"] == str(moved) and attrs["config"]["model"] == str(moved)  # edits load it there
    assert attrs["config_hash"] == hash_before
    from stages.invert import is_current, resolve_config

    assert is_current(ws, resolve_config(ws, {}))[0] is True
