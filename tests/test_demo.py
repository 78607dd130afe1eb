"""The demo runs the whole pipeline on a generated clip with the tiny model and says where things are."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stages.io.workspace import Workspace
from vdcli.app import app


def test_demo_runs_mask_invert_edit_eval_end_to_end(tmp_path):
    folder = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", str(folder), "--model", "tiny", "--frames", "4", "--size", "64",
                                      "--steps", "3", "--null-steps", "2", "--device", "cpu", "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    ws = Workspace.open(summary["workspace"])
    assert ws.read("video/frames").shape == (4, 64, 64, 3)
    assert ws.read("edits/blue/frames").shape == (4, 64, 64, 3)
    assert ws.group_attrs("inversion")["status"] == "done"
    assert (folder / "clip.vd" / "edits" / "blue" / "edit.mp4").stat().st_size > 0
    assert (folder / "clip.vd" / "masks" / "preview.gif").stat().st_size > 0
    assert "reconstruction" in summary["eval"] and "blue" in summary["eval"]
    assert summary["tiny"] is True and summary["commands"][0].startswith("vd mask ")
