"""QA regressions found by running the CLI: reserved edit names, -o checks, info step counts,
--compare over partly processed folders, demo interruption and output, strict JSON, error wording."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_workspace
from stages.io import video as vid
from stages.common.errors import Interrupted
from stages.io.synthetic import moving_disc
from test_edit import invert
from test_eval import build
from vdcli.app import app

runner = CliRunner()


def vd(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("vd: error: ") and text in lines[-1], result.stderr
    assert sum(ln.startswith("vd: error: ") for ln in lines) == 1 and "Traceback" not in result.output
    assert result.stdout.strip() == ""


@pytest.fixture(scope="module")
def inverted(tiny, tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("qa") / "ws")
    invert(ws, tiny, steps=2)
    return ws


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    import stages.models.load

    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the input is invalid")

    monkeypatch.setattr(stages.models.load, "load_models", refuse)


def test_edit_refuses_names_that_eval_reserves(inverted, no_load):
    for name in ("reconstruction", "plots"):
        r = vd("edit", inverted.path, "--prompt", "tiger", "--name", name)
        one_line_error(r, 3, "reserved")
        assert not (inverted.path / "edits" / name).exists()


def test_edit_output_that_is_a_directory_is_refused_before_any_work(inverted, no_load, tmp_path):
    r = vd("edit", inverted.path, "--prompt", "tiger", "--name", "odir", "-o", tmp_path)
    one_line_error(r, 2, "is a directory")
    (tmp_path / "file").write_text("x")
    r = vd("edit", inverted.path, "--prompt", "tiger", "--name", "odir", "-o", tmp_path / "file" / "out.mp4")
    one_line_error(r, 2, "is not a directory")
    assert not (inverted.path / "edits" / "odir").exists()


def test_info_counts_inversion_steps_not_done_flags(inverted, tmp_path):
    data = json.loads(vd("info", inverted.path, "--json").stdout)
    assert data["inversion"]["steps_total"] == 2 and data["inversion"]["steps_done"] == 2
    human = vd("info", inverted.path).stdout
    assert "2/2 steps" in human and "reconstruction PSNR" in human
    partial = tmp_path / "partial"
    shutil.copytree(inverted.path, partial)
    from stages.io.workspace import Workspace

    ws = Workspace.open(partial)
    done = ws.read("inversion/done")
    done[1:] = False
    ws.write_array("inversion/done", done)
    ws.update_attrs("inversion", status="running")
    assert "1/2 steps" in vd("info", partial).stdout
    ws.remove("inversion/done")  # interrupted before the first step was committed
    data = json.loads(vd("info", partial, "--json").stdout)
    assert (data["inversion"]["steps_done"], data["inversion"]["steps_total"]) == (0, 2)


def test_compare_skips_workspaces_with_nothing_to_evaluate(tmp_path):
    build(tmp_path / "clips" / "a", seed=0)
    make_workspace(tmp_path / "clips" / "b")  # masked only, not inverted yet
    r = vd("eval", "--compare", tmp_path / "clips", "-m", "psnr", "--json", "-q")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [p.rsplit("/", 1)[-1] for p in out["clips"]] == ["a"]
    assert list(out["skipped_clips"]) == [str(tmp_path / "clips" / "b")]
    assert out["groups"]["reconstruction"]["n"] == 1
    human = vd("eval", "--compare", tmp_path / "clips", "-m", "psnr", "-q")
    assert human.exit_code == 0 and "skipped" in human.stdout and "mean over 1 clip" in human.stdout
    one_line_error(vd("eval", "--compare", tmp_path / "clips" / "b", "-q"), 3, "nothing to evaluate")


def test_demo_interrupt_says_start_over_not_resume(tmp_path, monkeypatch):
    import stages.invert
    import stages.models.load

    def interrupted(*a, **k):
        raise Interrupted("interrupted; 0 of 3 null-text steps are saved, rerun the same command to resume")

    monkeypatch.setattr(stages.models.load, "load_models", lambda *a, **k: None)
    monkeypatch.setattr(stages.invert, "run_invert", interrupted)
    r = vd("demo", tmp_path / "d", "--model", "tiny", "--frames", "4", "--size", "64", "-q")
    one_line_error(r, 130, "start it over")
    assert "resume" not in r.stderr


def test_demo_summary_shows_scores():
    from vdcli.commands.demo import _scores

    lines = _scores({"recon": {"psnr": 21.5, "vae_psnr": 30.0},
                     "eval": {"reconstruction": {"metrics": {"psnr": 21.5}},
                              "blue": {"metrics": {"psnr_unedited": 25.25, "warp_error": 0.01,
                                                   "lpips_unedited": {"available": False}}}}})
    assert lines[0] == "reconstruction PSNR 21.50 dB (VAE-only ceiling 30.00 dB)"
    assert lines[1].startswith("edit blue: psnr_unedited 25.25, warp_error 0.01") and len(lines) == 2


def test_json_output_is_strict_even_with_nan_and_inf(capsys):
    from vdcli.common import run

    run(lambda progress: {"a": float("nan"), "b": [float("inf"), -math.inf], "c": np.float64("nan")},
        json_out=True, quiet=True)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    out = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert out == {"a": None, "b": ["inf", "-inf"], "c": None}


def test_error_messages_carry_the_reason_not_errno_noise(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video\n")
    r = vd("mask", fake, "--frames", "4", "--size", "64", "--box", "0,0,9,9", "--box-only", "-o", tmp_path / "w")
    one_line_error(r, 3, "not a readable video (Invalid data")
    assert "Errno" not in r.stderr
    video, _ = moving_disc(4, 64, 64)
    vid.write_mp4(tmp_path / "clip.mp4", video, 8)
    r = vd("mask", tmp_path / "clip.mp4", "--frames", "4", "--size", "64", "--point", "30,30", "--sam2", fake,
           "-o", tmp_path / "w", "-q")
    one_line_error(r, 3, "not a PyTorch checkpoint file")
    assert not (tmp_path / "w").exists()


def test_eval_and_demo_help_use_panels():
    ev = runner.invoke(app, ["eval", "-h"], env={"COLUMNS": "120"}).stdout
    assert "What to score" in ev and "Many clips" in ev and "Optional metric weights" in ev
    demo = runner.invoke(app, ["demo", "-h"], env={"COLUMNS": "120"}).stdout
    assert "Clip" in demo and "Model and run" in demo
