"""`vd edit` through the CLI: outputs, --json, --prompt-file with one model load, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_workspace
from test_edit import SOURCE, copy_workspace, invert
from vdcli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def ws(tiny, tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("cli") / "ws")
    invert(ws, tiny, steps=2)
    return ws


def vd(*args: str):
    return runner.invoke(app, ["edit", *map(str, args)])


def one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vd: error: ") and text in lines[0], result.stderr


def test_edit_json_summary_and_outputs(ws, loads, tmp_path):
    out = tmp_path / "out.mp4"
    r = vd(ws.path, "--prompt", "tiger", "--reweight", "tiger=2", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["name"] == "tiger" and data["resolved_prompt"] == SOURCE.replace("brown bear", "tiger")
    assert data["unet_calls"] == 2 and set(data["timings"]) >= {"edit", "decode", "write"}
    assert out.is_file() and data["outputs"]["output"] == str(out)
    assert (ws.path / "edits/tiger/edit.mp4").is_file() and (ws.path / "edits/tiger/preview.gif").is_file()
    assert "A tiger, walking" in r.stderr  # the resolved prompt is shown
    assert loads == ["tiny"]
    one_line_error(vd(ws.path, "--prompt", "tiger"), 3, "already exists")
    r = vd(ws.path, "--prompt", "tiger", "--force", "--no-sa1", "--no-sa2", "--no-cross", "--no-stdg", "-q")
    assert r.exit_code == 0 and r.stdout.strip().endswith("edit.mp4") and r.stderr == ""
    params = ws.group_attrs("edits/tiger")["params"]
    assert (params["sa1"], params["sa2"], params["cross"], params["stdg"]) == (False, False, False, False)


def test_prompt_file_runs_several_edits_with_one_model_load(ws, loads, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# edits\nwolf\n\nA white fox, walking on rocky terrain, next to a stone wall.\n")
    r = vd(ws.path, "--prompt-file", f, "--json", "-q")
    assert r.exit_code == 0, r.output
    names = [e["name"] for e in json.loads(r.stdout)["edits"]]
    assert names == ["wolf", "white-fox"] and loads == ["tiny"]
    assert ws.read("edits/white-fox/frames").shape == (4, 64, 64, 3)


def test_bad_inputs_give_one_line_errors(ws, loads, tiny, tmp_path):
    one_line_error(vd(tmp_path / "nope", "--prompt", "tiger"), 3, "not found")
    bare = make_workspace(tmp_path / "bare")
    one_line_error(vd(bare.path, "--prompt", "tiger"), 3, "no inversion")
    one_line_error(vd(ws.path, "--prompt", "tiger", "--name", "t2", "--reweight", "lion=2"), 3, "not in the target")
    one_line_error(vd(ws.path, "--prompt", "tiger", "--name", "t3", "--background"), 3, "--preset background")
    one_line_error(vd(ws.path, "--prompt", "tiger", "--reweight", "tiger"), 2, "WORD=NUMBER")
    one_line_error(vd(ws.path), 2, "exactly one of --prompt")
    one_line_error(vd(ws.path, "--prompt", "x", "--prompt-file", tmp_path / "f"), 2, "exactly one of")
    nosubj = copy_workspace(ws, tmp_path / "nosubj", subject=None)
    one_line_error(vd(nosubj.path, "--prompt", "tiger"), 3, "--subject")
    assert loads == []  # every check ran before loading the model
