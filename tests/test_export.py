"""`vd export` on real video: a 1280x720 clip at 30000/1001 fps with an AAC tone, rotation metadata and bt709
tags, made here with PyAV; workspaces made by the real `vd mask` (--box, no SAM2) at 256x128 (crop) from
frame 20. Edits are written straight into the workspace the way `vd edit` lays them out (edits/<name>/frames
+ attrs), except for one end-to-end run through the CLI with the tiny model (vd mask and vd export in their
own processes).

Geometry of the crop workspace (scale 0.2, 8 rows cut at the top): workspace (x, y) -> source (5x, 5(y + 8)).
The --box 96,32,160,96 mask is source rows 200..520, columns 480..800; the default feather at 720p is 6 px,
so alpha is exactly 0 from 2 * 6 px outside the mapped mask on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from stages.io.workspace import Workspace
from test_cli_edit import one_line_error as one_line
from vdcli.app import app

ROOT = Path(__file__).resolve().parents[1]
RATE = Fraction(30000, 1001)
FRAMES = 28  # the workspaces start at frame 20
COLOUR = (250, 30, 200)  # the edit's solid colour inside its region
MASK = ["--box", "96,32,160,96", "--box-only", "--no-ellipse"]


# ----------------------------------------------------------------------------------------- helpers
def make_clip(path: Path, width: int = 1280, height: int = 720, frames: int = FRAMES, rotation: int = 90,
              audio: bool = True) -> Path:
    """A textured moving clip (libx264, bt709 tags, rotation) with a 440 Hz stereo AAC tone as long as it."""
    yy, xx = np.mgrid[0:height, 0:width + 4 * frames]
    base = np.stack([128 + 90 * np.sin(xx / 23.0), 128 + 90 * np.sin(yy / 17.0 + xx / 61.0),
                     96 + 60 * np.cos((xx + yy) / 37.0)], -1).astype(np.uint8)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=RATE)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": "18", "preset": "ultrafast"}
        cc = video.codec_context
        cc.color_primaries = cc.color_trc = cc.colorspace = cc.color_range = 1  # bt709, limited range
        if rotation:
            video.set_display_rotation(rotation)
        sound = out.add_stream("aac", rate=48000) if audio else None
        if sound is not None:
            sound.layout = "stereo"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, 4 * i:4 * i + width]), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace=1, dst_color_range=1)
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None:
            total = int(round(frames / float(RATE) * 48000))
            tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(total) / 48000)).astype(np.float32)
            for k in range(0, total, 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.stack([tone[k:k + 1024]] * 2)),
                                                   format="fltp", layout="stereo")
                chunk.sample_rate, chunk.pts = 48000, k
                for packet in sound.encode(chunk):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
    return path


def probe(path: Path, keep: range | None = None) -> dict:
    """What a player sees: size, exact rate, frame count, rotation, colour tags, audio seconds; and the
    decoded RGB frames whose index is in `keep`."""
    out: dict = {"frames": 0, "pixels": {}}
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        cc = v.codec_context
        out.update(rate=v.average_rate, size=(cc.height, cc.width),
                   color=(cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range))
        for k, frame in enumerate(c.decode(v)):
            out["rotation"] = frame.rotation
            if keep is not None and k in keep:
                out["pixels"][k] = frame.to_ndarray(format="rgb24")
            out["frames"] += 1
    with av.open(str(path)) as c:
        out["audio"] = None
        if c.streams.audio:
            a = c.streams.audio[0]
            out["audio"] = sum(f.samples for f in c.decode(a)) / a.codec_context.sample_rate
    return out


def read_png(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]


def vd(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, *texts: str) -> None:
    """Exit `code`, one `vd: error:` line on stderr that holds every one of `texts`."""
    one_line(result, code, texts[0])
    for text in texts[1:]:
        assert text in result.stderr, result.stderr


def mask_workspace(clip: Path, dest: Path, *args: str) -> Workspace:
    r = vd("mask", clip, "--frames", "4", "--start", "20", "-o", dest, "-q", *args)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(dest)
    return Workspace.open(dest)


def add_edit(ws: Workspace, name: str, paint: tuple[int, int, int] = COLOUR, **params) -> np.ndarray:
    """An edit as `vd edit` stores it: the workspace frames with the region painted, status done."""
    frames = ws.read("video/frames").copy()
    mask = ws.read("masks/edit") > 0
    if params.get("background"):
        mask = ~mask
    frames[mask] = paint
    ws.write_array(f"edits/{name}/frames", frames)
    ws.update_attrs(f"edits/{name}", prompt=name, status="done", params={"prompt": name, **params})
    return frames


def outside(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    m = np.ones(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = False
    return m


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


@pytest.fixture(scope="module")
def source(clip) -> dict:
    return probe(clip, keep=range(FRAMES))


@pytest.fixture(scope="module")
def crop_ws(clip, tmp_path_factory) -> Workspace:
    ws = mask_workspace(clip, tmp_path_factory.mktemp("ws") / "crop.vd", "--size", "256x128", *MASK)
    add_edit(ws, "red")
    return ws


@pytest.fixture
def ws(crop_ws, tmp_path) -> Workspace:
    """A private copy of the crop workspace (tests add edits and change attrs)."""
    shutil.copytree(crop_ws.path, tmp_path / "ws.vd")
    return Workspace.open(tmp_path / "ws.vd")


# ----------------------------------------------------------------------------------------- outputs
def test_the_crop_workspace_is_what_the_numbers_say(crop_ws):
    src = crop_ws.attrs["source"]
    assert (src["size"], src["source_size"], src["indices"], src["resize"]) == ([128, 256], [720, 1280],
                                                                               [20, 21, 22, 23], "crop")
    mask = crop_ws.read("masks/edit")
    assert mask[:, 32:96, 96:160].all() and int(mask.sum()) == 4 * 64 * 64


def test_png_background_is_bit_exact_and_the_inside_is_the_edit(crop_ws, source, tmp_path):
    out = tmp_path / "frames"
    r = vd("export", crop_ws.path, "--codec", "png", "-o", out, "--color-match", "off", "--json", "-q")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["frames"], data["fps"], data["feather"], data["region"], data["span"]) == (4, "30000/1001", 6,
                                                                                           "subject", [20, 23])
    assert data["geometry"]["box"] == {"x": 0, "y": 40, "width": 1280, "height": 640}
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["000000.png", "000001.png", "000002.png", "000003.png"]
    far = outside((720, 1280), (200 - 13, 520 + 13), (480 - 13, 800 + 13))  # 2 * feather + 1 px of mask rounding
    for k, f in enumerate(files):
        frame, src = read_png(f), source["pixels"][20 + k]
        assert frame.shape == (720, 1280, 3)
        assert np.array_equal(frame[far], src[far]), k  # untouched: the decoded source, bit for bit
        inside = frame[215:505, 495:785]  # 15 px (3 workspace px of Lanczos reach) inside the mapped mask
        assert (inside == COLOUR).all(), k
        assert not np.array_equal(frame[195:200, 600:700], src[195:200, 600:700])  # the 6 px dilation shows


def test_h264_keeps_size_rate_rotation_colour_tags_and_the_span_audio(crop_ws, source):
    r = vd("export", crop_ws.path, "-q")  # the only finished edit, the default output, h264
    assert r.exit_code == 0, r.output
    out = crop_ws.path / "edits/red/export.mp4"
    assert r.stdout == f"{out}\n" and r.stderr == ""
    got = probe(out, keep=range(4))
    assert got["size"] == (720, 1280) and got["rate"] == Fraction(30000, 1001) and got["frames"] == 4
    assert got["rotation"] == 90 and got["color"] == (1, 1, 1, 1)  # bt709 primaries/transfer/matrix, tv range
    assert got["audio"] == pytest.approx(4 * 1001 / 30000, abs=0.03)  # the 4 frames' 0.133 s of tone
    far = outside((720, 1280), (187, 533), (467, 813))
    for k in range(4):
        frame, src = got["pixels"][k].astype(int), source["pixels"][20 + k].astype(int)
        assert np.abs(frame[far] - src[far]).mean() < 2.0  # only the codec's loss
        assert np.abs(frame[230:490, 510:770] - np.array(COLOUR)).mean() < 4.0
    record = crop_ws.group_attrs("edits/red")["exports"]["WS/edits/red/export.mp4"]  # relative: it is inside WS
    assert record["settings"]["codec"] == "h264" and record["settings"]["crf"] == 18


def test_whole_clip_has_every_frame_the_untouched_ones_bit_exact_and_the_whole_audio(crop_ws, source, tmp_path):
    out = tmp_path / "whole.mkv"  # ffv1: lossless RGB, so the untouched frames can be compared bit for bit
    r = vd("export", crop_ws.path, "--whole-clip", "--codec", "ffv1", "-o", out, "--color-match", "off", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["audio"]["copied"] is True  # the whole clip's audio packets, unchanged
    got = probe(out, keep=range(FRAMES))
    assert got["frames"] == FRAMES and got["rate"] == RATE and got["rotation"] == 90
    for k in [*range(20), *range(24, FRAMES)]:  # outside the span 20..23: the source's own frames
        assert np.array_equal(got["pixels"][k], source["pixels"][k]), k
    far = outside((720, 1280), (187, 533), (467, 813))
    assert np.array_equal(got["pixels"][21][far], source["pixels"][21][far])
    assert (got["pixels"][21][300:400, 600:700] == COLOUR).all()
    assert got["audio"] == pytest.approx(source["audio"], abs=0.03)
    assert source["audio"] == pytest.approx(FRAMES * 1001 / 30000, abs=0.05)


def test_audio_none_and_a_source_without_audio(clip, crop_ws, tmp_path):
    r = vd("export", crop_ws.path, "--audio", "none", "-o", tmp_path / "mute.mp4", "-q")
    assert r.exit_code == 0, r.output
    assert probe(tmp_path / "mute.mp4")["audio"] is None
    silent = make_clip(tmp_path / "silent.mp4", width=320, height=180, frames=24, rotation=0, audio=False)
    ws = mask_workspace(silent, tmp_path / "silent.vd", "--size", "128x64", "--box", "20,10,60,40", "--box-only")
    add_edit(ws, "red")
    r = vd("export", ws.path, "--json", "-q")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["audio"] is None and data["rotation"] == 0 and data["size"] == [180, 320]


@pytest.mark.parametrize("mode,size,box,rows,cols", [
    # pad: 1280x720 -> 256x256 is 256x144 content at rows 56..200; the box touches the content's top edge
    ("pad", "256x256", "96,56,160,120", (0, 320), (480, 800)),
    # stretch: 1280x720 -> 128x128 scales rows by 128/720 and columns by 1/10
    ("stretch", "128x128", "48,32,80,96", (180, 540), (480, 800)),
])
def test_pad_and_stretch_map_back(clip, source, tmp_path, mode, size, box, rows, cols):
    ws = mask_workspace(clip, tmp_path / f"{mode}.vd", "--size", size, "--resize", mode, "--box", box, "--box-only",
                        "--no-ellipse")
    add_edit(ws, "red")
    r = vd("export", ws.path, "--codec", "png", "-o", tmp_path / "png", "--color-match", "off", "--feather", "4",
           "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["geometry"]["box"] == {"x": 0, "y": 0, "width": 1280, "height": 720}
    frame = read_png(tmp_path / "png" / "000000.png")
    far = outside((720, 1280), (max(rows[0] - 10, 0), rows[1] + 10), (cols[0] - 10, cols[1] + 10))
    assert np.array_equal(frame[far], source["pixels"][20][far])
    reach = 3 * 10  # Lanczos: 3 workspace px of the coarser axis, in source px
    top = rows[0] + reach if rows[0] else 0  # pad: the frame's top rows are the edit's, not the black bar's
    assert (frame[top:rows[1] - reach, cols[0] + reach:cols[1] - reach] == COLOUR).all()


def test_a_sampled_workspace_exports_its_frames_at_the_sampled_rate(clip, tmp_path):
    ws = mask_workspace(clip, tmp_path / "stride.vd", "--size", "256x128", "--stride", "2", *MASK)
    add_edit(ws, "red")
    r = vd("export", ws.path, "-o", tmp_path / "s.mp4", "--json")
    assert r.exit_code == 0, r.output
    assert "note: the workspace samples the clip" in r.stderr and "15000/1001 fps" in r.stderr
    got = probe(tmp_path / "s.mp4")
    assert got["rate"] == Fraction(15000, 1001) and got["frames"] == 4
    assert got["audio"] == pytest.approx(4 * 1001 / 15000, abs=0.03)
    one_line_error(vd("export", ws.path, "--whole-clip", "-o", tmp_path / "w.mp4"), 2, "--whole-clip", "--stride")
    assert not (tmp_path / "w.mp4").exists()


def test_background_edit_pastes_the_complement(ws, source, tmp_path):
    add_edit(ws, "sky", paint=(10, 200, 10), background=True)
    r = vd("export", ws.path, "--edit", "sky", "--codec", "png", "-o", tmp_path / "png", "--color-match", "off",
           "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["region"] == "background"
    frame = read_png(tmp_path / "png" / "000000.png")
    inside = (slice(200 + 13, 520 - 13), slice(480 + 13, 800 - 13))  # the subject, 2 * feather + 1 px inward
    assert np.array_equal(frame[inside], source["pixels"][20][inside])
    assert (frame[60:150, 20:400] == (10, 200, 10)).all()
    assert np.array_equal(frame[:40], source["pixels"][20][:40])  # above the crop box: no edit there


def test_colour_match_lowers_the_seam(ws, source, tmp_path):
    frames = ws.read("video/frames").astype(np.float32)
    mask = ws.read("masks/edit") > 0
    shifted = np.clip(frames * 0.92 + np.array([18.0, -12.0, 6.0]), 0, 255).astype(np.uint8)  # a VAE-like shift
    shifted[mask] = COLOUR
    ws.write_array("edits/red/frames", shifted)
    results = {}
    for match in ("off", "on"):
        r = vd("export", ws.path, "--codec", "png", "-o", tmp_path / match, "--color-match", match, "--json", "-q")
        assert r.exit_code == 0, r.output
        results[match] = json.loads(r.stdout)["color_match"]
    assert results["off"]["seam_before"] == results["off"]["seam_after"] > 8.0
    assert results["on"]["seam_after"] < 2.0 < 8.0 < results["on"]["seam_before"]
    ring = (slice(540, 550), slice(500, 780))  # 20..30 px below the mask, where alpha is 0
    fade = (slice(526, 532), slice(500, 780))  # 6..12 px below it: the feathered band over the background
    src = source["pixels"][20].astype(int)
    bias = {}
    for match in ("off", "on"):
        frame = read_png(tmp_path / match / "000000.png").astype(int)
        assert np.array_equal(frame[ring], src[ring])
        bias[match] = np.abs((frame[fade] - src[fade]).mean(axis=(0, 1)))  # the seam's colour step per channel
    assert bias["off"].max() > 4.0 and bias["on"].max() < 1.5, bias


# ----------------------------------------------------------------------------------------- inputs
def test_the_source_moved_or_changed(ws, clip, tmp_path):
    source = dict(ws.attrs["source"])
    ws.update_attrs(source={**source, "path": str(tmp_path / "gone.mp4")})
    one_line_error(vd("export", ws.path, "-o", tmp_path / "a.mp4"), 3, str(tmp_path / "gone.mp4"), "--source")
    r = vd("export", ws.path, "-o", tmp_path / "a.mp4", "--source", clip, "-q")
    assert r.exit_code == 0, r.output
    other = make_clip(tmp_path / "other.mp4", width=320, height=180, frames=24, rotation=0, audio=False)
    one_line_error(vd("export", ws.path, "-o", tmp_path / "b.mp4", "--source", other), 3, "sha256", "--source")
    assert not (tmp_path / "b.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_bad_inputs_get_one_line_and_write_nothing(ws, tmp_path, monkeypatch):
    out = tmp_path / "out.mp4"
    one_line_error(vd("export", ws.path, "--edit", "nope", "-o", out), 3, "no edit 'nope'", "red")
    add_edit(ws, "blue", paint=(0, 0, 255))
    ws.update_attrs("edits/blue", status="running")
    one_line_error(vd("export", ws.path, "--edit", "blue", "-o", out), 3, "not finished")
    ws.update_attrs("edits/blue", status="done")
    one_line_error(vd("export", ws.path, "-o", out), 2, "blue, red", "--edit")
    out.write_bytes(b"keep me")
    one_line_error(vd("export", ws.path, "--edit", "red", "-o", out), 3, "exists", "--force")
    assert out.read_bytes() == b"keep me"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(vd("export", ws.path, "--edit", "red", "-o", blocker / "sub" / "o.mp4"), 3, "cannot write")
    one_line_error(vd("export", ws.path, "--edit", "red", "--codec", "png", "--crf", "10", "-o", tmp_path / "p"), 2,
                   "--crf")
    one_line_error(vd("export", ws.path, "--edit", "red", "--codec", "vp9", "-o", tmp_path / "v.webm"), 2, "--codec")
    one_line_error(vd("export", ws.path, "--edit", "red", "--color-match", "maybe", "-o", out), 2, "on or off")
    import stages.export.config as config

    monkeypatch.setitem(config.CODECS, "h265", config.Codec(("libnothere265",), "yuv420p", (".mp4",), crf=20))
    one_line_error(vd("export", ws.path, "--edit", "red", "--codec", "h265", "-o", tmp_path / "h.mp4"), 3,
                   "no h265 encoder", "h264")
    assert out.read_bytes() == b"keep me" and not (tmp_path / "h.mp4").exists() and not (tmp_path / "p").exists()
    r = vd("export", ws.path, "--edit", "red", "-o", out, "--force", "-q")
    assert r.exit_code == 0 and probe(out)["frames"] == 4


def test_is_current_follows_the_settings_and_the_edit(ws, tmp_path):
    from stages.export import ExportConfig, is_current, run_export

    cfg = ExportConfig(output=str(tmp_path / "x.mp4"), audio="none")
    assert is_current(ws, cfg)[0] is False
    run_export(ws, cfg)
    assert is_current(ws, cfg) == (True, "")
    ok, why = is_current(ws, ExportConfig(output=str(tmp_path / "x.mp4"), audio="none", crf=23))
    assert not ok and "crf" in why
    ws.update_attrs("edits/red", timings={"edit": 1.0})  # the edit was redone
    ok, why = is_current(ws, cfg)
    assert not ok and "redone" in why


def test_a_stale_edit_is_not_delivered(ws, tmp_path):
    """An edit whose inputs changed since it was made (here the workspace frames it read, then its inversion)
    is refused like `vd edit`/`vd eval` refuse stale work: exit 3, the fix named, nothing written."""
    from stages.export import ExportConfig, is_current
    from stages.io.reads import Reads

    out = tmp_path / "s.mp4"
    ws.update_attrs("edits/red", reads=Reads(ws).of(["video/frames"]))
    assert vd("export", ws.path, "--edit", "red", "-o", out, "-q").exit_code == 0
    cfg = ExportConfig(edit="red", output=str(out))
    assert is_current(ws, cfg) == (True, "")
    frames = ws.read("video/frames").copy()
    frames[0, 0, 0] ^= 1  # one value of the frames the edit was made from
    ws.write_array("video/frames", frames)
    ok, why = is_current(ws, cfg)
    assert not ok and why == "edit 'red' is stale (video/frames changed since it was made)"
    again = tmp_path / "t.mp4"
    one_line_error(vd("export", ws.path, "--edit", "red", "-o", again), 3, "edit 'red' is stale",
                   "video/frames changed", f"vd edit {ws.path} --name red --force")
    ws.update_attrs("edits/red", reads=None, inversion="an inversion since removed")
    one_line_error(vd("export", ws.path, "--edit", "red", "-o", again), 3, "its inversion is gone")
    assert not again.exists()


def test_edit_regions_by_kind(tmp_path):
    from conftest import make_workspace
    from stages.export.region import edit_region

    ws = make_workspace(tmp_path / "ws", objects={"dog": (np.zeros((4, 64, 64)), "dog"),
                                                  "cat": (np.ones((4, 64, 64)), "cat")})
    assert edit_region(ws, {"params": {"regions": {"dog": "a wolf"}}}).arrays == ("masks/objects/dog/edit",)
    assert edit_region(ws, {"params": {"background": True}}).kind == "background"
    assert edit_region(ws, {"params": {"first_frame": "/x.png"}}).kind == "whole"
    assert edit_region(ws, {"params": {"prompt": "tiger"}}).arrays == ("masks/edit",)
    region = edit_region(ws, {"params": {"regions": {"dog": "a wolf", "cat": "a lion"}}})
    assert region.kind == "objects" and region.frame(ws, 0).all()


# ----------------------------------------------------------------------------------------- end to end
def test_clip_to_export_through_the_cli_with_the_tiny_model(clip, loads, tmp_path):
    """vd mask and vd export run as their own processes; vd invert and vd edit run the tiny model through the
    CLI in this one (its model loads once per test module)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VD_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    def process(*args: object) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "vdcli.app", *map(str, args)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    ws = process("mask", clip, "--frames", "4", "--start", "20", "--size", "128x64", "--box", "40,16,88,56",
                 "--box-only", "-o", tmp_path / "e2e.vd", "-q").stdout.strip()
    r = vd("invert", ws, "--prompt", "a red disc on a textured wall", "--subject", "red disc", "--model", "tiny",
           "--steps", "2", "--null-steps", "1", "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    r = vd("edit", ws, "--prompt", "blue cube", "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    assert loads == ["tiny", "tiny"]
    r = process("export", ws, "--json", "-q")
    assert r.stderr == ""
    data = json.loads(r.stdout)
    assert data["name"] == "blue-cube" and data["region"] == "subject" and data["feather"] == 6
    assert data["color_match"]["seam_before"] > 0 and data["color_match"]["seam_after"] > 0
    got = probe(Path(data["output"]))
    assert (got["size"], got["rate"], got["frames"], got["rotation"]) == ((720, 1280), RATE, 4, 90)
    assert got["audio"] == pytest.approx(4 * 1001 / 30000, abs=0.03)
