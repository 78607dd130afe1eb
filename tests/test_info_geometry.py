"""`vd info` shows the source-to-workspace geometry: source size, crop box or pad box, scale, frame span.

A 320x180 clip made here (no model). Expected values worked out by hand:
- crop to 128x128: scale max(128/180, 128/320) = 0.7111; the scaled source is round(320 * 0.7111) = 228 by
  128, cut at x 50 (= (228 - 128) / 2), so the workspace covers source columns 70..250 (centres 50/0.7125
  - 0.5 up to 178/0.7125 - 0.5) and every row: the central 180x180 square. Scale per axis: 228/320 = 0.7125
  (x), 128/180 = 0.711111 (y).
- pad to 128x128: scale min(128/180, 128/320) = 0.4; the picture is 128x72 at rows 28..100.
- --start 20 --stride 2 --frames 4: source frames 20, 22, 24, 26.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from test_export import make_clip
from vdcli.app import app


def vd(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "c.mp4", width=320, height=180, frames=28, rotation=0,
                     audio=False)


def mask(clip, dest, *args):
    r = vd("mask", clip, "--frames", "4", "--start", "20", "--size", "128x128", "--box", "40,40,80,80",
           "--box-only", "-o", dest, "-q", *args)
    assert r.exit_code == 0, r.output
    return dest


def test_crop_geometry_and_span_in_text_and_json(clip, tmp_path):
    ws = mask(clip, tmp_path / "crop.vd", "--stride", "2")
    r = vd("info", ws, "--json")
    assert r.exit_code == 0, r.output
    geom = json.loads(r.stdout)["geometry"]
    assert geom["source_size"] == [180, 320] and geom["size"] == [128, 128] and geom["mode"] == "crop"
    assert geom["scale"] == [pytest.approx(128 / 180, abs=1e-6), pytest.approx(0.7125, abs=1e-6)]
    assert geom["scaled"] == [128, 228] and geom["offset"] == [0, 50]
    assert geom["box"] == {"x": 70, "y": 0, "width": 180, "height": 180}
    assert geom["span"] == {"start": 20, "end": 26, "stride": 2, "frames": 4, "fps_sample": None}
    text = vd("info", ws)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert ("geometry   source 320x180 -> workspace 128x128 (crop), scale 0.7125 x 0.711111 (x, y), "
            "source box x 70..250, y 0..180 (180x180 px)") in lines
    assert "span       source frames 20 .. 26, stride 2 (4 frames)" in lines


def test_pad_geometry_names_where_the_picture_sits(clip, tmp_path):
    ws = mask(clip, tmp_path / "pad.vd", "--resize", "pad")
    geom = json.loads(vd("info", ws, "--json").stdout)["geometry"]
    assert geom["scale"] == [pytest.approx(0.4), pytest.approx(0.4)] and geom["scaled"] == [72, 128]
    assert geom["pad_box"] == {"x": 0, "y": 28, "width": 128, "height": 72}
    assert geom["box"] == {"x": 0, "y": 0, "width": 320, "height": 180}  # the whole source is in the workspace
    assert geom["span"]["start"] == 20 and geom["span"]["end"] == 23 and geom["span"]["stride"] == 1
    lines = vd("info", ws).stdout.splitlines()
    assert ("geometry   source 320x180 -> workspace 128x128 (pad), scale 0.4, picture at x 0..128, y 28..100 "
            "of the workspace (bars around it)") in lines


def test_a_workspace_without_a_source_size_has_no_geometry(tmp_path):
    from conftest import make_workspace
    from stages.info import format_info, run_info

    ws = make_workspace(tmp_path / "ws")
    source = {k: v for k, v in (ws.attrs.get("source") or {}).items() if k != "source_size"}
    ws.update_attrs(source=source)
    info = run_info(ws.path)
    assert info["geometry"] is None
    assert not any(line.startswith("geometry") for line in format_info(info))
