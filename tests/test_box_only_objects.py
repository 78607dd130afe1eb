"""`vd mask --box-only` with several `--object`s (issue 26): each object's own --box is its mask on every frame,
overlaps go to the smaller box, and objects without a box are refused in one line. Through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stages.io.synthetic import moving_disc
from stages.io.workspace import Workspace
from vdcli.app import app

runner = CliRunner()
FRAMES, SIZE = 3, 64
MAN, HAT = (4, 8, 40, 60), (10, 8, 30, 20)  # X0,Y0,X1,Y1: the hat's box lies inside the man's


def write_frames(folder: Path, frames: int, size: int, seed: int) -> Path:
    """A moving-disc clip as a folder of PNG frames (lossless: the colours are exact)."""
    for k, frame in enumerate(moving_disc(frames, size, size, seed=seed)[0]):
        Image.fromarray(frame).save(folder / f"{k:02d}.png")
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_frames(tmp_path_factory.mktemp("frames"), FRAMES, SIZE, seed=3)


def vd(*args):
    return runner.invoke(app, [str(a) for a in args])


def box(b: tuple[int, int, int, int]) -> str:
    return ",".join(map(str, b))


def rect(b: tuple[int, int, int, int]) -> np.ndarray:
    out = np.zeros((SIZE, SIZE), np.uint8)
    out[b[1]:b[3], b[0]:b[2]] = 1
    return out


def test_each_object_gets_its_own_box_and_the_smaller_box_wins_the_overlap(clip, tmp_path):
    ws_path = tmp_path / "ws"
    r = vd("mask", clip, "--frames", FRAMES, "--size", SIZE, "-o", ws_path, "--box-only", "--no-ellipse", "--json",
           "--object", "man=tall man", "--box", box(MAN), "--object", "hat=red hat", "--box", box(HAT))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["mask"]["method"] == "box" and [o["name"] for o in out["objects"]] == ["man", "hat"]
    assert [o["box"] for o in out["objects"]] == [list(map(float, MAN)), list(map(float, HAT))]
    assert out["overlap_pixels"] == {"man|hat": FRAMES * 20 * 12}  # the hat's 20x12 box, on every frame
    ws = Workspace.open(ws_path)
    man, hat = ws.read("masks/objects/man/raw"), ws.read("masks/objects/hat/raw")
    assert man.shape == (FRAMES, SIZE, SIZE)
    for f in range(FRAMES):
        np.testing.assert_array_equal(hat[f], rect(HAT))
        np.testing.assert_array_equal(man[f], rect(MAN) - rect(HAT))  # 36x52 - 20x12 = 1632 pixels
    assert int(man[0].sum()) == 1632 and not (man & hat).any()
    np.testing.assert_array_equal(ws.read("masks/raw"), np.maximum(man, hat))
    np.testing.assert_array_equal(ws.read("masks/objects/man/edit"), man)  # --no-ellipse: edit == raw
    attrs = ws.group_attrs("masks/objects")
    assert attrs["phrases"] == {"man": "tall man", "hat": "red hat"}
    assert attrs["coverage"] == {"man": round(1632 / SIZE**2, 5), "hat": round(240 / SIZE**2, 5)}
    assert ws.group_attrs("masks")["method"] == "box"


def test_order_does_not_decide_the_overlap_and_the_ellipse_is_per_object(clip, tmp_path):
    r = vd("mask", clip, "--frames", FRAMES, "--size", SIZE, "-o", tmp_path / "ws", "--box-only",
           "--object", "hat", "--box", box(HAT), "--object", "man", "--box", box(MAN))
    assert r.exit_code == 0, r.output
    ws = Workspace.open(tmp_path / "ws")
    np.testing.assert_array_equal(ws.read("masks/objects/hat/raw")[1], rect(HAT))
    np.testing.assert_array_equal(ws.read("masks/objects/man/raw")[1], rect(MAN) - rect(HAT))
    for name in ("hat", "man"):
        raw, edit = ws.read(f"masks/objects/{name}/raw"), ws.read(f"masks/objects/{name}/edit")
        assert (edit >= raw).all() and edit.sum() > raw.sum()  # raw OR its ellipse: the ellipse reaches past corners
    np.testing.assert_array_equal(ws.read("masks/edit"), np.maximum(ws.read("masks/objects/hat/edit"),
                                                                    ws.read("masks/objects/man/edit")))


def one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("vd: error: ") and text in lines[-1], result.stderr
    assert sum(line.startswith("vd: error: ") for line in lines) == 1 and "Traceback" not in result.output


def test_objects_without_a_box_or_with_other_prompts_are_refused_in_one_line(clip, tmp_path):
    ws = tmp_path / "ws"
    base = ["mask", clip, "--frames", FRAMES, "--size", SIZE, "-o", ws, "--box-only"]
    one_line_error(vd(*base, "--object", "man", "--box", box(MAN), "--object", "dog", "--point", "5,5"), 2,
                   "--box-only: object 'dog' has no --box")
    one_line_error(vd(*base, "--object", "man", "--box", box(MAN), "--object", "dog", "--text", "dog"), 2,
                   "--box-only: object 'dog' has no --box")
    one_line_error(vd(*base, "--object", "man", "--box", box(MAN), "--point", "20,30"), 2,
                   "drop object 'man''s --point/--text")
    one_line_error(vd(*base, "--object", "a", "--box", box(HAT), "--object", "b", "--box", box(HAT)), 3,
                   "object 'b' is empty: its --box lies under object 'a''s")
    one_line_error(vd(*base, "--point", "20,30"), 2, "--box-only needs --box")
    assert not ws.exists()  # every refusal before the workspace is written
