"""CLI contract of `vd invert` not covered elsewhere: an unexpected error exits 1 with one line (a traceback
only with VD_DEBUG=1), --restart really discards the stored inversion, and changed masks are refused with
the --restart hint. The UNet is the stand-in of tests/fake_unet.py (S = 2: STDG's coefficient is 0 at
both steps, so no attention pass is needed), loaded through the `loads` fixture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import stages.models.ops
from conftest import make_workspace
from fake_unet import fake_invert_eps
from vdcli.app import app

PROMPT = "a red disc on a textured wall"
FAST = ["--model", "tiny", "--steps", "2", "--null-steps", "1", "--device", "cpu", "-q"]


def vd(*args):
    return CliRunner().invoke(app, ["invert", *map(str, args)])


def error_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.strip()]


@pytest.fixture
def fake_unet(loads, monkeypatch):
    monkeypatch.setattr(stages.models.ops, "unet_eps", fake_invert_eps)
    return loads


def test_unexpected_error_is_exit_1_one_line_and_a_traceback_only_with_vd_debug(tmp_path, monkeypatch):
    import stages.invert

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the stage\nsecond line of detail")

    monkeypatch.setattr(stages.invert, "run_invert", broken)
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.delenv("VD_DEBUG", raising=False)
    r = vd(ws.path, "--prompt", PROMPT, *FAST)
    assert r.exit_code == 1, r.output
    assert error_lines(r) == ["vd: error: unexpected RuntimeError: boom in the stage (set VD_DEBUG=1 for a traceback)"]
    assert r.stdout.strip() == ""
    monkeypatch.setenv("VD_DEBUG", "1")
    r = vd(ws.path, "--prompt", PROMPT, *FAST)
    lines = error_lines(r)
    assert r.exit_code == 1 and lines[0].startswith("Traceback") and "in broken" in r.stderr
    assert lines[-1].startswith("vd: error: unexpected RuntimeError: boom in the stage")


def test_restart_discards_everything_the_old_inversion_stored(tmp_path, fake_unet):
    ws = make_workspace(tmp_path / "ws")
    r = vd(ws.path, "--prompt", PROMPT, *FAST, "--store-components", "--no-stdg", "--cfg", "5")
    assert r.exit_code == 0, r.output
    assert ws.has("inversion/stdg/components")
    old = ws.read("inversion/recon_latents")
    r = vd(ws.path, "--prompt", PROMPT, *FAST, "--no-stdg", "--cfg", "3")  # refused without --restart
    assert r.exit_code == 3 and "--restart" in error_lines(r)[0] and "cfg 5.0 -> 3.0" in error_lines(r)[0]
    # --restart keeps the stored settings that no flag overrides: --no-store-components turns that one off
    r = vd(ws.path, "--prompt", PROMPT, *FAST, "--no-stdg", "--cfg", "3", "--restart", "--no-store-components",
           "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_from"] == 0
    assert not ws.has("inversion/stdg/components")  # nothing of the old run survives
    attrs = ws.group_attrs("inversion")
    assert attrs["cfg"] == 3.0 and attrs["config"]["store_components"] is False
    fresh = make_workspace(tmp_path / "fresh")
    assert vd(fresh.path, "--prompt", PROMPT, *FAST, "--no-stdg", "--cfg", "3").exit_code == 0
    for name in ("latents", "recon_latents", "null_embeddings", "stdg/guidance"):
        assert np.array_equal(ws.read(f"inversion/{name}"), fresh.read(f"inversion/{name}")), name
    assert not np.array_equal(old, ws.read("inversion/recon_latents"))


def test_changed_masks_are_refused_with_the_restart_hint(tmp_path, fake_unet):
    ws = make_workspace(tmp_path / "ws")
    assert vd(ws.path, "--prompt", PROMPT, *FAST).exit_code == 0  # STDG on: the masks are part of the settings
    stored = ws.read("inversion/recon_latents")
    mask = ws.read("masks/edit")
    mask[:, :8] = 1 - mask[:, :8]
    ws.write_array("masks/edit", mask)
    r = vd(ws.path)
    lines = error_lines(r)
    assert r.exit_code == 3 and len(lines) == 1 and lines[0].startswith("vd: error: "), r.output
    assert "masks" in lines[0] and "--restart" in lines[0]
    assert np.array_equal(ws.read("inversion/recon_latents"), stored)  # refused before touching anything
    r = vd(ws.path, "--prompt", PROMPT, *FAST, "--restart", "--json")  # --restart drops the stored settings too
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_from"] == 0
