"""`vd batch` after a manifest change redoes exactly the stages the change affects, using each stage's own
`is_current`, and says why: a rerun of an unchanged manifest loads no model; new frames -> mask and all
after (no --force needed); new model content -> inversion and edits; a new edit prompt -> that edit; a new
box with STDG off -> mask and edits (the inversion read no mask); a new subject -> stored on the inversion,
and the edits whose prompt replaced it.
Tiny model saved as a diffusers folder (so it has content), 8-frame clip, 64 px, local engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import model_files
from vdcli.app import app

runner = CliRunner()
MANIFEST = """\
defaults:
  model: {model}
  frames: {frames}
  size: 64
  invert: {{steps: 2, null_steps: 1}}
  box: {box}
  box_only: true
  prompt: "a red disc on a grey textured background"
  subject: "{subject}"
{extra}  edits: ["blue cube", {{prompt: "{green}", name: green}}]
  eval: {{metrics: [psnr]}}
clips:
  - clip: a.mp4
"""


def write_manifest(folder: Path, frames: int = 4, green: str = "green ball", subject: str = "red disc",
                   box: tuple[int, ...] = (16, 16, 48, 48), no_stdg: bool = False) -> Path:
    path = folder / "m.yaml"
    path.write_text(MANIFEST.format(model=folder / "model", frames=frames, green=green, subject=subject,
                                    box=list(box), extra="  no_stdg: true\n" if no_stdg else ""))
    return path


def batch(manifest: Path, out: Path, *extra: str) -> dict:
    r = runner.invoke(app, ["batch", str(manifest), "--out", str(out), "--threads-per-worker", "1", "-q", "--json",
                            *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Clip, model folder (+ adapter via VD_MOTION_ADAPTER) and one complete run of the manifest."""
    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    folder = tmp_path_factory.mktemp("fresh")
    video, _ = moving_disc(8, 64, 64, seed=0)
    write_mp4(folder / "a.mp4", video, fps=8.0)
    parts = model_files.tiny_parts()
    model_files.write_config_folder(folder / "model", parts)
    model_files.write_adapter_folder(folder / "adapter", parts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VD_MOTION_ADAPTER", str(folder / "adapter"))
        mp.setenv("XDG_CACHE_HOME", str(folder / "xdg"))
        rep = batch(write_manifest(folder), folder / "out")
    clip = rep["clips"][0]
    assert clip["run"] == ["mask", "invert", "edit", "eval"], clip
    assert clip["stages"]["edit"]["edits_run"] == ["blue-cube", "green"]
    return folder


@pytest.fixture
def env(base, monkeypatch, tmp_path):
    monkeypatch.setenv("VD_MOTION_ADAPTER", str(base / "adapter"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(base / "xdg"))
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    return base, out


def stages_of(rep: dict) -> dict:
    return rep["clips"][0]["stages"]


def test_unchanged_manifest_skips_every_stage_without_loading_a_model(env):
    base, out = env
    rep = batch(write_manifest(base), out)
    assert rep["counts"]["stages_run"] == 0 and rep["counts"]["stages_skipped"] == 4
    assert rep["model_loads"]["total"] == 0  # the model identity comes from its files, not a load


def test_new_edit_prompt_redoes_that_edit_only(env):
    base, out = env
    rep = batch(write_manifest(base, green="green cube"), out)
    st = stages_of(rep)
    assert rep["clips"][0]["skipped"] == ["mask", "invert"] and rep["clips"][0]["run"] == ["edit", "eval"]
    assert st["edit"]["edits_run"] == ["green"] and st["edit"]["edits_skipped"] == ["blue-cube"]
    assert "edit 'green' was made with other settings (prompt)" in st["edit"]["why"]
    assert "green is" in st["eval"]["why"] or "scores of green" in st["eval"]["why"]


def test_new_frames_redo_mask_and_every_later_stage_without_force(env):
    base, out = env
    manifest = write_manifest(base, frames=6)
    rep = batch(manifest, out)
    st = stages_of(rep)
    assert rep["clips"][0]["run"] == ["mask", "invert", "edit", "eval"]
    assert st["mask"]["why"] == "mask settings changed (frames 4 -> 6)"
    assert st["edit"]["edits_run"] == ["blue-cube", "green"]
    from stages.io.workspace import Workspace

    ws = Workspace.open(out / "a.vd")
    assert ws.read("video/frames").shape[0] == 6 and ws.read("edits/green/frames").shape[0] == 6
    again = batch(manifest, out)  # and it stays done
    assert again["counts"]["stages_run"] == 0


def test_new_model_content_redoes_inversion_and_edits(env):
    from safetensors.torch import load_file, save_file

    base, out = env
    weights = base / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    try:
        state = load_file(str(weights))
        key = sorted(state)[len(state) // 2]  # a middle tensor, as a merged LoRA would change it
        state[key] = state[key] + 0.01
        save_file(state, str(weights))
        r = runner.invoke(app, ["batch", str(write_manifest(base)), "--out", str(out), "--threads-per-worker",
                                "1", "-q"])
        assert r.exit_code == 0, r.output
        assert "a: invert ran: the model's content changed (sd15-animatediff-v2-" in r.stdout
        assert "a: edit ran: edit 'blue-cube' is stale: made from another inversion" in r.stdout
        rep = batch(write_manifest(base), out)  # then everything is current again
        assert rep["counts"]["stages_run"] == 0
    finally:
        weights.write_bytes(original)
    from stages.io.workspace import Workspace

    ws = Workspace.open(out / "a.vd")
    made = ws.group_attrs("inversion")["settings"]["model_fingerprint"]
    from stages.models.resolve import model_identity

    assert made != model_identity(str(base / "model"))  # restored weights: the inversion is stale again


def test_old_workspace_without_recorded_settings_reruns_mask_not_for_good(env):
    """Masks from an older vd (no settings recorded) are redone; identical masks keep the inversion."""
    base, out = env
    from stages.io.workspace import Workspace

    ws = Workspace.open(out / "a.vd")
    attrs = dict(ws.group_attrs("masks"))
    attrs.pop("settings")
    import zarr

    zarr.open_group(str(out / "a.vd" / "masks"), mode="r+").attrs.put(attrs)
    rep = batch(write_manifest(base), out)
    st = stages_of(rep)
    assert rep["clips"][0]["run"] == ["mask"] and "older vd" in st["mask"]["why"]


def test_changed_box_with_stdg_off_redoes_the_edits_not_the_inversion(env):
    """STDG off: the inversion reads no mask, the edits do (SA-II): a new box redoes mask, edits and eval."""
    base, out = env
    first = batch(write_manifest(base, no_stdg=True), out)
    assert "stdg" in stages_of(first)["invert"]["why"]
    rep = batch(write_manifest(base, no_stdg=True, box=(8, 8, 40, 40)), out)
    clip = rep["clips"][0]
    assert clip["run"] == ["mask", "edit", "eval"] and clip["skipped"] == ["invert"], clip
    st = stages_of(rep)
    assert st["edit"]["edits_run"] == ["blue-cube", "green"] and "masks/edit" in st["edit"]["why"]
    again = batch(write_manifest(base, no_stdg=True, box=(8, 8, 40, 40)), out)
    assert again["counts"]["stages_run"] == 0


def test_changed_subject_keeps_the_inversion_and_redoes_the_edits_that_replaced_it(env):
    """`subject` is used only by the edits (a short prompt replaces it): the inversion is kept, its stored
    subject updated without loading a model, and the edits whose resolved prompt changed are redone."""
    from stages.io.workspace import Workspace

    base, out = env
    ws = Workspace.open(out / "a.vd")
    latents, made = ws.read("inversion/latents"), ws.group_attrs("inversion")["config_hash"]
    raw, frames = ws.read("masks/objects/red_disc/raw"), ws.read("video/frames")
    rep = batch(write_manifest(base, subject="disc"), out)
    st = stages_of(rep)
    # the mask is not tracked again: its one object is renamed after the new subject, its masks kept
    assert st["mask"]["relabelled"] == {"from": "red_disc", "to": "disc"}, st["mask"]
    assert ws.group_attrs("masks/objects")["names"] == ["disc"] and not ws.has("masks/objects/red_disc")
    assert np.array_equal(ws.read("masks/objects/disc/raw"), raw) and np.array_equal(ws.read("video/frames"), frames)
    assert st["invert"]["status"] == "run" and "subject" in st["invert"]["why"], st["invert"]
    assert not st["invert"].get("restarted") and not st["invert"].get("resumed")
    attrs = ws.group_attrs("inversion")
    assert attrs["subject"] == "disc" and attrs["config_hash"] == made
    assert np.array_equal(ws.read("inversion/latents"), latents)
    assert st["edit"]["edits_run"] == ["blue-cube", "green"] and "subject" in st["edit"]["why"]
    assert ws.group_attrs("edits/blue-cube")["resolved_prompt"] == "a red blue cube on a grey textured background"
    again = batch(write_manifest(base, subject="disc"), out)
    assert again["counts"]["stages_run"] == 0
