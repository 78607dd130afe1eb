"""`vd mask` and `vd info` through the CLI: stdout contract, JSON, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stages.io import video as vid
from stages.io.synthetic import moving_disc
from vdcli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 10-frame 96x128 clip, its per-source-frame PNG masks and a text file posing as a video."""
    root = tmp_path_factory.mktemp("assets")
    video, masks = moving_disc(10, 96, 128, seed=5)
    vid.write_mp4(root / "clip.mp4", video, 10)
    (root / "masks").mkdir()
    for i, m in enumerate(masks):
        Image.fromarray(m * 255).save(root / "masks" / f"{i:03d}.png")
    (root / "fake.mp4").write_text("hello, I am not a video\n")
    return root


def vd(*args: str, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_one_line_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("vd: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress lines may precede it
    assert "Traceback" not in result.output
    for word in words:
        assert word in errors[0], errors[0]
    assert result.stdout.strip() == ""


def test_mask_prints_only_the_workspace_path(tmp_path, assets):
    ws = tmp_path / "w.vd"
    result = vd("mask", assets / "clip.mp4", "--frames", "4", "--size", "64", "--mask-dir", assets / "masks",
                "-o", ws)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [str(ws.resolve())]
    assert (ws / "masks" / "preview.gif").is_file()


def test_default_workspace_is_named_after_the_clip(tmp_path, assets, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = vd("mask", assets / "clip.mp4", "--frames", "2", "--size", "64", "--mask-dir", assets / "masks", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "clip.vd") and result.stderr == ""


def test_mask_json_summary_and_info(tmp_path, assets):
    ws = tmp_path / "w.vd"
    result = vd("mask", assets / "clip.mp4", "--frames", "3", "--size", "128x64", "--fps", "5", "--mask-dir",
                assets / "masks", "-o", ws, "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["frames"] == 3 and summary["size"] == [64, 128] and summary["fps_out"] == 5.0
    assert summary["indices"] == [0, 2, 4] and summary["mask"]["method"] == "mask-dir"
    assert len(summary["mask"]["coverage_edit"]) == 3 and Path(summary["preview"]).is_file()
    info = vd("info", ws, "--json")
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["source"]["indices"] == [0, 2, 4] and data["masks"]["method"] == "mask-dir"
    assert data["inversion"] is None and data["sizes"]["total"] > 0
    human = vd("info", ws)
    assert human.exit_code == 0 and "mask-dir" in human.stdout and "inversion  none" in human.stdout


def test_info_reads_any_subset_of_stages(tmp_path):
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path / "ws")
    ws.update_attrs("inversion", status="running", prompt="a disc", model={"spec": "tiny"})
    ws.write_array("inversion/done", np.array([True, True, False]))
    ws.update_attrs("edits/blue", prompt="a blue disc", status="done")
    ws.update_attrs("eval/reconstruction", metrics={"psnr": 31.5})
    data = json.loads(vd("info", ws.path, "--json").stdout)
    assert data["inversion"]["steps_done"] == 2 and data["inversion"]["steps_total"] == 3
    assert data["inversion"]["model"] == "tiny" and data["edits"][0]["name"] == "blue"
    assert data["eval"][0]["metrics"] == {"psnr": 31.5}
    assert data["masks"]["coverage_raw_mean"] > 0  # computed from the arrays when attrs are missing
    human = vd("info", ws.path)
    assert human.exit_code == 0 and "2/3 steps" in human.stdout and "blue" in human.stdout


@pytest.fixture
def no_sam2(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("VD_SAM2_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "none"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "none"))


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, assets, no_sam2):
    clip, masks, ws = assets / "clip.mp4", assets / "masks", tmp_path / "bad.vd"
    base = ["--size", "64", "-o", ws]
    cases = [
        ((tmp_path / "missing.mp4", "--mask-dir", masks), 3, "not found"),
        ((assets / "fake.mp4", "--mask-dir", masks), 3, "not a readable video"),
        ((clip, "--frames", "11", "--mask-dir", masks), 3, "has 10 frames"),
        ((clip, "--frames", "0", "--mask-dir", masks), 2, "1..100000 or 'all' (got 0)"),
        ((clip, "--frames", "-3", "--mask-dir", masks), 2, "1..100000 or 'all' (got -3)"),
        ((clip, "--frames", "4", "--size", "100", "--mask-dir", masks), 2, "multiple of 64"),
        ((clip, "--frames", "4", "--mask-dir", tmp_path / "nomasks"), 3, "not found"),
        ((clip, "--frames", "4", "--point", "70,10", "--sam2", "random"), 3, "outside"),
        ((clip, "--frames", "4", "--box", "0,0,20,99", "--box-only"), 3, "outside"),
        ((clip, "--frames", "4", "--point", "1;2"), 2, "--point"),
        ((clip, "--frames", "4", "--box", "10,10,40,40"), 4, "--box-only"),
        ((clip, "--frames", "4", "--point", "10,10", "--sam2", "small"), 4, "sam2.1_hiera_small.pt"),
        ((clip, "--frames", "4"), 2, "no mask source"),
        ((clip, "--frames", "4", "--stride", "2", "--fps", "5", "--mask-dir", masks), 2, "--fps"),
    ]
    for args, code, word in cases:
        result = vd("mask", *base, *args)
        assert_one_line_error(result, code, word)
        assert not ws.exists(), args


def test_bad_mask_folders_and_empty_prompt_frame(tmp_path, assets):
    clip, ws = assets / "clip.mp4", tmp_path / "bad.vd"
    three = tmp_path / "three"
    three.mkdir()
    for i in range(3):
        Image.fromarray(np.ones((96, 128), np.uint8)).save(three / f"{i}.png")
    assert_one_line_error(vd("mask", clip, "--frames", "4", "--size", "64", "--mask-dir", three, "-o", ws),
                          3, "has 3 PNGs")
    small = tmp_path / "small"
    small.mkdir()
    for i in range(4):
        Image.fromarray(np.ones((30, 40), np.uint8)).save(small / f"{i}.png")
    assert_one_line_error(vd("mask", clip, "--frames", "4", "--size", "64", "--mask-dir", small, "-o", ws),
                          3, "40x30")
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(4):
        value = 0 if i == 2 else 1
        Image.fromarray(np.full((96, 128), value, np.uint8)).save(empty / f"{i}.png")
    assert_one_line_error(vd("mask", clip, "--frames", "4", "--size", "64", "--mask-dir", empty,
                             "--prompt-frame", "2", "-o", ws), 3, "frame 2 is empty")
    assert not ws.exists()


def test_workspace_from_another_clip_needs_force(tmp_path, assets):
    ws = tmp_path / "w.vd"
    other = tmp_path / "other.mp4"
    vid.write_mp4(other, moving_disc(10, 96, 128, seed=9)[0], 10)
    args = ["--frames", "2", "--size", "64", "--mask-dir", assets / "masks", "-o", ws]
    assert vd("mask", assets / "clip.mp4", *args).exit_code == 0
    assert_one_line_error(vd("mask", other, *args), 3, "another clip")
    result = vd("mask", other, *args, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(vd("info", ws, "--json").stdout)["source"]["path"] == str(other.resolve())
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep.txt").write_text("mine")
    assert_one_line_error(vd("mask", assets / "clip.mp4", *args[:-1], plain), 3, "not a vd workspace")


def test_sam2_random_through_the_cli_on_a_middle_frame(tmp_path, assets):
    result = vd("mask", assets / "clip.mp4", "--frames", "3", "--size", "64", "--sam2", "random",
                "--point", "30,30", "--point", "5,5,0", "--prompt-frame", "1", "-o", tmp_path / "s.vd", "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["mask"]["method"] == "sam2" and len(summary["mask"]["coverage_raw"]) == 3


def test_info_on_a_non_workspace(tmp_path):
    assert_one_line_error(vd("info", tmp_path / "nope"), 3, "not found")


# ------------------------------------------------------------------------------------------ named objects
@pytest.fixture
def fake_tracking(monkeypatch):
    """SAM2 replaced by a recorder: object k's mask is its box (or a 5 px square round its first point)."""
    from stages.models import sam2_track

    calls: list[tuple[list, int]] = []

    def track_objects(predictor, frames, prompts, prompt_frame=0, progress=None):
        calls.append(([(list(p), list(b) if b is not None else None) for p, b in prompts], prompt_frame))
        masks = np.zeros((len(prompts), *frames.shape[:3]), np.uint8)
        for k, (points, box) in enumerate(prompts):
            x0, y0, x1, y1 = box if box is not None else (points[0][0] - 5, points[0][1] - 5, points[0][0] + 5,
                                                          points[0][1] + 5)
            masks[k, :, int(y0):int(y1), int(x0):int(x1)] = 1
        return masks, np.zeros((len(prompts), len(prompts)), np.int64)

    monkeypatch.setattr(sam2_track, "load_predictor", lambda checkpoint, device="auto": object())
    monkeypatch.setattr(sam2_track, "track_objects", track_objects)
    return calls


def test_named_objects_keep_their_own_prompts_from_the_command_line(tmp_path, assets, fake_tracking):
    ws = tmp_path / "two.vd"
    result = vd("mask", assets / "clip.mp4", "--frames", "3", "--size", "64", "--sam2", "random", "--point", "9,9",
                "--object", "left=red disc", "--box", "2,2,20,20", "--point", "5,5", "--object=right",
                "--point=40,40", "--point", "60,1,0", "--prompt-frame", "1", "-o", ws, "--json", "-q")
    assert result.exit_code == 2 and "before any --object" in result.stderr and not ws.exists()
    result = vd("mask", assets / "clip.mp4", "--frames", "3", "--size", "64", "--sam2", "random",
                "--object", "left=red disc", "--box", "2,2,20,20", "--point", "5,5", "--object=right",
                "--point=40,40", "--prompt-frame", "1", "--point", "60,1,0", "-o", ws, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert fake_tracking == [([([(5.0, 5.0, 1)], [2.0, 2.0, 20.0, 20.0]), ([(40.0, 40.0, 1), (60.0, 1.0, 0)], None)],
                              1)]
    summary = json.loads(result.stdout)
    assert [(o["name"], o["phrase"]) for o in summary["objects"]] == [("left", "red disc"), ("right", None)]
    assert summary["overlap_pixels"] == {"left|right": 0}
    info = json.loads(vd("info", ws, "--json").stdout)["masks"]
    assert [o["name"] for o in info["objects"]] == ["left", "right"]
    assert info["objects"][0]["coverage"] == pytest.approx(18 * 18 / 64 / 64, abs=1e-4)
    human = vd("info", ws).stdout
    assert "objects    left 'red disc' 7.9%, right 2.4%" in human


def test_the_single_object_form_is_one_object_named_after_the_subject(tmp_path, assets, fake_tracking):
    ws = tmp_path / "one.vd"
    result = vd("mask", assets / "clip.mp4", "--frames", "2", "--size", "64", "--sam2", "random", "--box",
                "10,10,30,30", "--subject", "red disc", "-o", ws, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert [(o["name"], o["phrase"]) for o in json.loads(result.stdout)["objects"]] == [("red_disc", "red disc")]
    assert fake_tracking[0][0] == [([], [10.0, 10.0, 30.0, 30.0])]


def test_bad_objects_give_one_line_errors_and_write_nothing(tmp_path, assets, fake_tracking, no_sam2, monkeypatch):
    from stages.models import detector as det

    clip, ws = assets / "clip.mp4", tmp_path / "bad.vd"
    base = [clip, "--frames", "2", "--size", "64", "--sam2", "random", "-o", ws]
    cases = [
        (("--object", "a", "--box", "1,1,9,9", "--object", "a", "--point", "5,5"), 2, "duplicate object name 'a'"),
        (("--object", "a", "--box", "1,1,9,9", "--object", "b"), 2, "'b' has no --point, --box or --text"),
        (("--object", "a/b", "--box", "1,1,9,9"), 2, "object name 'a/b'"),
        (("--object", "a", "--box", "1,1,9,9", "--box", "2,2,9,9"), 2, "two --box"),
        (("--box", "1,1,9,9", "--box", "2,2,9,9"), 2, "one per object"),
        (("--object", "a", "--box", "1,1,9,9", "--object", "b", "--point", "5,5", "--box-only"), 2,
         "--box-only: object 'b' has no --box"),
        (("--object", "a", "--box", "1,1,9,9", "--subject", "bear"), 2, "--subject"),
        (("--object", "a", "--box", "1,1,99,9"), 3, "outside"),
        (("--object", "a", "--text", "cat"), 4, "vd models --get grounding-dino"),
        (("--object", "a", "--box", "1,1,9,9", "--text-threshold", "0"), 2, "--text-threshold"),
    ]
    monkeypatch.setenv(det.ENV_DETECTOR, str(tmp_path / "none"))
    for args, code, words in cases:
        assert_one_line_error(vd("mask", *base, *args), code, words)
        assert not ws.exists(), args
    assert fake_tracking == []  # every refusal came before tracking

    folder = tmp_path / "gdino"  # a detector folder (its files are only looked at; loading is faked)
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    monkeypatch.setattr(det, "load_detector", lambda path, device="auto": object())
    monkeypatch.setattr(det, "detect", lambda model, image, phrase, limit=8: [det.Detection((2, 2, 9, 9), 0.1)])
    assert_one_line_error(vd("mask", *base, "--object", "a", "--text", "cat", "--detector", folder), 3,
                          "--text 'cat' (object 'a')", "best 0.10")
    assert not ws.exists() and fake_tracking == []
