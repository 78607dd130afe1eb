"""Issue 12 through the CLI: settings validated before anything is destroyed, one writer per stage
(locks, stale locks), non-finite numbers, typed presets, damaged workspaces named (and nothing written),
one-line usage errors. Each item runs its main case as a separate `vd` process (`vd`), further cases
in-process (`cli`, same checks; cheaper on 2 cores). No model is run: every case fails (or is refused)
before one would be needed, except the --restart case that fails loading it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_workspace
from stages.io import locks as stagelock
from stages.io.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red disc on a textured wall"
S, F = 2, 4


def vd(*args: object) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "vdcli.app", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def cli(*args: object) -> subprocess.CompletedProcess:
    """The same command in this process (Typer's test runner), shaped like a finished process."""
    from vdcli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def one_line_error(r: subprocess.CompletedProcess, code: int, *texts: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("vd: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "╭" not in r.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def tree_hash(path: Path) -> str:
    """Hash of every file's relative path and bytes under `path` (the attribute lock file aside)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != ".vd.lock":
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def inverted(path: Path) -> Workspace:
    """A workspace with a finished inversion's arrays and attributes (random numbers: nothing here runs
    the model, the stages only have to find a done inversion to refuse to damage or read)."""
    ws = make_workspace(path, frames=F, size=64)
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((S + 1, F, 4, 8, 8)).astype(np.float32)
    ws.write_array("inversion/latents", lat)
    ws.write_array("inversion/recon_latents", lat)
    ws.write_array("inversion/null_embeddings", rng.standard_normal((S, F, 77, 32)).astype(np.float32))
    ws.write_array("inversion/stdg/guidance", rng.standard_normal((S, F, 4, 8, 8)).astype(np.float32))
    ws.write_array("inversion/done", np.ones(S + 1, bool), chunks=(1,))
    ws.write_array("inversion/reconstruction", ws.read("video/frames"))
    ws.update_attrs("inversion", status="done", steps=S, schedule="vd", prompt=PROMPT, negative_prompt="",
                    subject="red disc", region="foreground", cfg=7.5, shared_null=False,
                    model={"spec": "tiny", "fingerprint": "test"}, config={"model": "tiny", "seed": 42})
    return ws


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return inverted(tmp_path / "ws")


def damage(ws: Workspace, name: str, index: int = 0) -> None:
    """Truncate one chunk of array `name` (as a full disk or a bad copy would)."""
    chunk = sorted(p for p in (ws.path / name / "c").rglob("*") if p.is_file())[index]
    chunk.write_bytes(chunk.read_bytes()[:10])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# 1 ------------------------------------------------------------------------------------------------
def test_1_bad_settings_and_failed_restarts_destroy_nothing(ws, tmp_path):
    before = tree_hash(ws.path)
    one_line_error(vd("invert", ws.path, "--prompt", PROMPT, "--model", "tiny", "--seed", "99999999999999999999",
                      "--restart"), 2, "--seed must fit a 64-bit integer")
    one_line_error(cli("invert", ws.path, "--prompt", PROMPT, "--steps", "0", "--restart"), 2, "--steps")
    # valid settings, the lock taken, but the model cannot load: the finished inversion stays
    one_line_error(cli("invert", ws.path, "--prompt", PROMPT, "--model", tmp_path / "none.safetensors",
                      "--restart", "--device", "cpu", "-q"), 4, "not found")
    assert tree_hash(ws.path) == before and not (ws.path / ".locks").exists()
    assert ws.group_attrs("inversion")["status"] == "done"


# 2 ------------------------------------------------------------------------------------------------
def test_2_one_writer_per_stage_and_stale_locks_are_taken_over(ws, tmp_path):
    before = tree_hash(ws.path)
    held = stagelock.acquire(ws.path, "inversion", "vd invert (test)")
    try:
        err = one_line_error(vd("invert", ws.path, "--prompt", PROMPT, "--model", "tiny", "--restart"), 3,
                             "is being written by", f"pid {os.getpid()}", "started ")
        assert "vd invert (test)" in err
        # a reader of the inversion (vd edit of any name) is refused too, rather than reading half of it
        one_line_error(cli("edit", ws.path, "--prompt", "a blue disc on a textured wall"), 3, "being written by")
        info = json.loads(cli("info", ws.path, "--json").stdout)
        assert f"pid {os.getpid()}" in info["inversion"]["writer"]
    finally:
        held.release()
    with stagelock.scope():  # vd mask needs the whole workspace; a running stage holds it shared
        stagelock.hold(ws.path, stagelock.WORKSPACE, "vd edit (test)", shared=True)
        stagelock.hold(ws.path, "edits/blue", "vd edit (test)")
        one_line_error(cli("edit", ws.path, "--prompt", "a blue disc on a textured wall", "--name", "blue"), 3,
                       "edit 'blue'", "being written by")
        with pytest.raises(stagelock.StageBusy, match="in use by another vd process .*vd edit \\(test\\)"):
            stagelock.acquire(ws.path, stagelock.WORKSPACE, "vd mask")
    assert tree_hash(ws.path) == before and not (ws.path / ".locks").exists()

    # a lock file left by a killed `vd mask` (dead pid, same host) does not block the next run
    from stages.demo import write_clip

    (tmp_path / "clip").mkdir()
    clip, masks = write_clip(tmp_path / "clip", F, 64)
    target = tmp_path / "new.vd"
    lock = stagelock.lock_path(target, stagelock.WORKSPACE)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": 0, "command": "vd mask"}))
    r = vd("mask", clip, "-o", target, "--frames", F, "--size", 64, "--mask-dir", masks, "-q")
    assert r.returncode == 0, r.stderr
    assert Workspace.open(target).read("masks/edit").shape == (F, 64, 64) and not lock.parent.exists()


# 3 ------------------------------------------------------------------------------------------------
def test_3_non_finite_and_out_of_range_numbers_are_refused(ws, tmp_path):
    before = tree_hash(ws.path)
    one_line_error(vd("edit", ws.path, "--prompt", "a blue disc on a textured wall", "--reweight", "blue=nan"), 2,
                   "blue=nan", "finite")
    one_line_error(cli("edit", ws.path, "--prompt", "a blue disc on a textured wall", "--tau-s", "inf"), 2, "--tau-s")
    one_line_error(cli("invert", ws.path, "--prompt", PROMPT, "--cfg", "nan", "--restart"), 2, "--cfg", "finite")
    preset = tmp_path / "nan.yaml"
    preset.write_text("invert:\n  cfg: .nan\n")
    one_line_error(cli("invert", ws.path, "--prompt", PROMPT, "--preset", preset, "--restart"), 3,
                   str(preset), "section invert", "cfg must be a finite number")
    assert tree_hash(ws.path) == before and not (ws.path / "edits").exists()
    one_line_error(vd("mask", tmp_path / "any.mp4", "--fps", "nan", "-o", tmp_path / "m.vd"), 2, "--fps", "finite")
    assert not (tmp_path / "m.vd").exists()


# 4 ------------------------------------------------------------------------------------------------
def test_4_preset_values_are_type_checked(ws, tmp_path):
    before = tree_hash(ws.path)
    for run, body, key, wanted in [(vd, "invert:\n  steps: many\n", "steps", "must be an integer, got 'many'"),
                                   (cli, "invert:\n  stdg: 5\n", "stdg", "must be a list, got 5"),
                                   (cli, "invert:\n  prompt: [1, 2]\n", "prompt", "must be a text, got [1, 2]")]:
        preset = tmp_path / f"{key}.yaml"
        preset.write_text(body)
        one_line_error(run("invert", ws.path, "--preset", preset, "--restart"), 3,
                       f"preset {preset}, section invert: {key} {wanted}")
    assert tree_hash(ws.path) == before


# 5 ------------------------------------------------------------------------------------------------
def test_5_damage_is_named_nothing_is_written_and_info_check_lists_it(ws, tmp_path):
    damage(ws, "inversion/null_embeddings", 1)
    before = tree_hash(ws.path)
    one_line_error(vd("edit", ws.path, "--prompt", "a blue disc on a textured wall"), 3,
                   "inversion/null_embeddings", str(ws.path), "damaged", "vd invert", "--restart")
    assert tree_hash(ws.path) == before and not (ws.path / "edits").exists()
    r = vd("info", ws.path, "--check", "--json")
    one_line_error(r, 3, "damaged", "inversion/null_embeddings")  # JSON on stdout, the one line on stderr
    check = json.loads(r.stdout)["check"]
    assert not check["ok"] and [p["name"] for p in check["problems"]] == ["inversion/null_embeddings"]

    other = inverted(tmp_path / "frames")
    damage(other, "video/frames", 2)
    before = tree_hash(other.path)
    one_line_error(cli("edit", other.path, "--prompt", "a blue disc on a textured wall"), 3,
                   "video/frames", "damaged", "vd mask")
    one_line_error(cli("eval", other.path, "-m", "psnr"), 3, "video/frames", "damaged")
    assert tree_hash(other.path) == before and not (other.path / "edits").exists()

    clean = inverted(tmp_path / "clean")
    (clean.path / "inversion/null_embeddings/c/1").rename(clean.path / "lost")  # a flagged step's data is gone
    r = cli("info", clean.path, "--check", "--json")
    assert r.returncode == 3 and "chunks of flagged step(s) [1] are missing" in r.stdout
    (clean.path / "lost").rename(clean.path / "inversion/null_embeddings/c/1")
    r = cli("info", clean.path, "--check")
    assert r.returncode == 0 and "check      ok" in r.stdout and r.stderr == ""


# 6 ------------------------------------------------------------------------------------------------
def test_6_usage_errors_are_one_line(ws):
    one_line_error(vd("invert", ws.path, "--steps", "five"), 2, "'--steps'", "vd")
    one_line_error(cli("edit", ws.path, "--no-such-option"), 2, "No such option: --no-such-option")
    one_line_error(cli("invert"), 2, "Missing argument 'WS'")
    r = cli("invert", "--help")
    assert r.returncode == 0 and "--restart" in r.stdout and r.stderr == ""
