"""`vd ui` without a browser: ROOT confinement, uploads, the objects a click makes, the security checks, every
page action through vdcli.ui.actions.Studio (tiny model, 4 frames, 64 px, 2 steps) including Stop and the
one-job rule, and the named API endpoints through gradio_client against a server the test starts."""

from __future__ import annotations

import json
import shlex
import socket

import numpy as np
import pytest
from typer.testing import CliRunner

from stages.common.errors import InputError, Interrupted, ModelMissingError, UsageError
from stages.io.synthetic import moving_disc
from stages.io.video import write_mp4
from stages.io.workspace import Workspace
from stages.mask.preview import colour
from vdcli.app import app
from vdcli.ui import objects as obj
from vdcli.ui.actions import Studio
from vdcli.ui.paths import Root, parse_bytes
from vdcli.ui.server import ServeOptions, check, is_loopback, parse_auth

BOX = [16, 16, 48, 48]
DISC = [{"name": "disc", "phrase": "red disc", "points": [[32, 32, 1]], "box": BOX, "text": None}]


pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # Gradio's own pandas deprecations


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "root"
    folder.mkdir()
    video, _ = moving_disc(4, 128, 128, seed=0)
    write_mp4(folder / "disc.mp4", video, 8.0)
    return folder


# ------------------------------------------------------------------------------------------ paths
def test_root_confines_every_path_and_lists_only_its_own(root, tmp_path):
    r = Root(root)
    assert r.inside("disc.mp4") == root / "disc.mp4" and r.inside(str(root / "disc.mp4")) == root / "disc.mp4"
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    (root / "link.mp4").symlink_to(outside)
    for escape in ("../secret.mp4", str(outside), "link.mp4", "sub/../../secret.mp4", "/etc/passwd"):
        with pytest.raises(InputError, match="outside the page's root"):
            r.inside(escape, "clip")
    with pytest.raises(UsageError):
        r.inside("  ", "clip")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.mp4").write_bytes(b"x")
    Workspace.create(root / "a.vd", {"sha256": "s"})
    (root / "a.vd" / "inner.mp4").write_bytes(b"x")  # never listed from inside a workspace
    assert r.clips() == ["disc.mp4"] and r.workspaces() == ["a.vd"]


def test_uploads_are_size_limited_typed_and_kept_under_root(root, tmp_path):
    r = Root(root)
    script = tmp_path / "run.sh"
    script.write_text("echo hi")
    with pytest.raises(InputError, match="not a clip"):
        r.save_upload(script, 10**6)
    clip = tmp_path / "my clip!.MP4"
    clip.write_bytes(b"0" * 2000)
    with pytest.raises(InputError, match="limit is"):
        r.save_upload(clip, 1000)
    saved = r.save_upload(clip, 10**6)
    assert saved == root / "uploads" / "my_clip.mp4" and saved.read_bytes() == clip.read_bytes()
    assert r.save_upload(clip, 10**6) == saved  # the same bytes again: no second copy
    other = tmp_path / "my clip!.mp4"
    other.write_bytes(b"1" * 2000)
    assert r.save_upload(other, 10**6) == root / "uploads" / "my_clip-2.mp4"
    assert parse_bytes("500MB") == 500 * 2**20 and parse_bytes("2g") == 2 * 2**30
    with pytest.raises(UsageError):
        parse_bytes("lots")


# ------------------------------------------------------------------------------------------ objects
def test_clicks_make_points_and_boxes_and_the_mask_flags():
    objects = [obj.blank()]
    objects, corner, _ = obj.click(objects, "object", 10, 12, "object point")
    objects, corner, _ = obj.click(objects, "object", 3, 4, "background point")
    assert objects[0]["points"] == [[10, 12, 1], [3, 4, 0]] and corner is None
    objects, corner, said = obj.click(objects, "object", 40, 8, obj.BOX_MODE)
    assert corner == [40, 8] and "opposite corner" in said and objects[0]["box"] is None
    objects, corner, _ = obj.click(objects, "object", 20, 30, obj.BOX_MODE, corner)
    assert objects[0]["box"] == [20, 8, 41, 31] and corner is None
    objects = obj.add_object(objects, "dog", "small  dog")
    objects = obj.set_field(objects, "dog", "text", "small dog")
    fields, flags, _ = obj.mask_options(obj.parse_objects(obj.dump_objects(objects)), box_only=False)
    assert fields["objects"][0] == {"name": "object", "phrase": None, "points": ["10,12,1", "3,4,0"],
                                    "box": "20,8,41,31", "text": None} and not fields["box_only"]
    assert flags == ["--object", "object", "--point", "10,12,1", "--point", "3,4,0", "--box", "20,8,41,31",
                     "--object", "dog=small dog", "--text", "small dog"]
    with pytest.raises(UsageError, match="box only needs a box for every object; 'dog' has none"):
        obj.mask_options(objects, box_only=True)
    fields, flags, note = obj.mask_options(obj.parse_objects(DISC), box_only=True)
    assert fields == {"objects": [{"name": "disc", "phrase": "red disc", "points": [], "box": "16,16,48,48",
                                   "text": None}], "box_only": True}
    assert flags == ["--box-only", "--object", "disc=red disc", "--box", "16,16,48,48"]
    assert note == "box only: the points and phrase searches of 'disc' are not used"
    with pytest.raises(UsageError, match="no points, box or text"):
        obj.mask_options(obj.add_object(objects, "cat"), box_only=False)
    with pytest.raises(UsageError, match="not valid JSON"):
        obj.parse_objects("[{")
    with pytest.raises(UsageError, match="two objects"):
        obj.parse_objects([{"name": "a"}, {"name": "a"}])
    with pytest.raises(UsageError):
        obj.parse_objects([{"name": "../x"}])
    assert obj.undo_point(objects, "object")[0]["points"] == [[10, 12, 1]]


def test_points_and_boxes_are_drawn_in_each_objects_colour():
    frame = np.zeros((64, 64, 3), np.uint8)
    two = obj.parse_objects([{"name": "a", "points": [[20, 20, 1], [50, 10, 0]]},
                             {"name": "b", "box": [30, 30, 60, 60]}])
    out = obj.draw(frame, two)
    assert tuple(out[20, 20]) == colour(0) and tuple(out[17, 20]) == (255, 255, 255)  # object point: white ring
    assert tuple(out[8, 50]) == colour(0) and not out[10, 50].any()  # background point: a black bar across
    assert tuple(out[30, 45]) == colour(1) and tuple(out[59, 45]) == colour(1)  # the box's top and bottom
    assert not out[45, 45].any()  # the box is outlined, not filled


# ------------------------------------------------------------------------------------------ security
def test_the_page_is_local_unless_a_login_is_required(monkeypatch, tmp_path):
    monkeypatch.delenv("VD_UI_AUTH", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert check(ServeOptions(tmp_path)) is None
    with pytest.raises(UsageError, match="--auth"):
        check(ServeOptions(tmp_path, host="0.0.0.0"))
    assert check(ServeOptions(tmp_path, host="0.0.0.0", auth="ann:pw:x")) == ("ann", "pw:x")
    monkeypatch.setenv("VD_UI_AUTH", "bob:secret")
    assert check(ServeOptions(tmp_path, host="0.0.0.0")) == ("bob", "secret")
    for bad in ("nopass", ":pw", "user:"):
        with pytest.raises(UsageError):
            parse_auth(bad)
    monkeypatch.delenv("VD_UI_AUTH")
    r = CliRunner().invoke(app, ["ui", str(tmp_path), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and r.stderr.strip().startswith("vd: error: --host 0.0.0.0 exposes the page")
    assert len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["ui", str(tmp_path / "missing")])
    assert r.exit_code == 3 and "not a folder" in r.stderr


# ------------------------------------------------------------------------------------------ actions
def test_track_writes_what_the_shown_vd_mask_command_writes(root, tmp_path):
    studio = Studio(root, device="cpu")
    opened = studio.open_clip("disc.mp4", "4", "64")
    assert opened["workspace"] == str(root / "disc.vd") and opened["frames"] == 4 and opened["size"] == [64, 64]
    assert not (root / "disc.vd").exists()  # nothing is written before Track
    with pytest.raises(InputError, match="outside"):
        studio.open_clip("../elsewhere.mp4")
    done = studio.track(opened["workspace"], json.dumps(DISC), box_only=True)
    ws = Workspace.open(root / "disc.vd")
    assert ws.group_attrs("masks")["method"] == "box" and done["preview"].endswith("masks/preview.gif")
    argv = shlex.split(done["command"])
    assert argv[:2] == ["vd", "mask"] and "--box-only" in argv
    argv[argv.index("-o") + 1] = str(root / "cli.vd")
    r = CliRunner().invoke(app, argv[1:] + ["-q"])
    assert r.exit_code == 0, r.output
    cli = Workspace.open(root / "cli.vd")
    for name in ("video/frames", "masks/raw", "masks/edit", "masks/objects/disc/raw"):
        np.testing.assert_array_equal(ws.read(name), cli.read(name))
    assert ws.group_attrs("masks")["settings"] == cli.group_attrs("masks")["settings"]
    # the preview shows the box in the object's colour on the prompt frame
    from PIL import Image

    with Image.open(ws.file_path("masks/preview.gif")) as gif:
        shown = np.asarray(gif.convert("RGB")).astype(int)
    assert np.abs(shown[16, 30] - np.array(colour(0))).max() < 40
    # the page reopens its workspace and opens the one the CLI made, with their objects and prompts
    again = studio.open_workspace("disc.vd")
    assert again["objects"] == [{"name": "disc", "phrase": "red disc", "points": [], "box": BOX, "text": None}]
    assert again["preview"] == done["preview"] and "vd-workspace/1" in again["info"]
    assert studio.open_workspace("cli.vd")["objects"] == again["objects"]
    with pytest.raises(InputError, match="outside"):
        studio.open_workspace(str(tmp_path))


def test_track_says_plainly_when_sam2_weights_are_missing(root, tmp_path, monkeypatch):
    monkeypatch.setenv("VD_SAM2_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    studio = Studio(root, device="cpu")
    usable, line = studio.sam2_state()
    assert not usable and line.startswith("No SAM2 weights found") and "box only" in line
    ws = studio.open_clip("disc.mp4", "4", "64")["workspace"]
    with pytest.raises(ModelMissingError, match="--box-only"):
        studio.track(ws, json.dumps(DISC), box_only=False)
    assert not (root / "disc.vd").exists()
    assert Studio(root, sam2="random").sam2_state()[1].startswith("SAM2 runs with RANDOM weights")


def test_invert_edit_eval_stop_and_one_job_at_a_time(root, loads):
    studio = Studio(root, model="tiny", device="cpu")
    ws = studio.open_clip("disc.mp4", "4", "64")["workspace"]
    studio.track(ws, json.dumps(DISC), box_only=True)
    plan = studio.estimate(ws, "a red disc", "red disc", None, 2, 1)
    assert "predicted peak memory" in plan["text"] and plan["command"].endswith("--dry-run")
    assert not Workspace.open(ws).has("inversion")

    # Stop after the first null-text step: the stage's own interruption keeps that step; a rerun resumes
    stops = []

    def stop_soon(done, total, description):
        if description.startswith("null-text") and not stops:
            stops.append(studio.stop())

    with pytest.raises(Interrupted, match="steps are saved"):
        studio.invert(ws, "a red disc", "red disc", None, 2, 1, report=stop_soon)
    assert stops and "stopping invert" in stops[0] and "stopped" in studio.status()
    done = studio.invert(ws, "a red disc", "red disc", None, 2, 1)
    assert "reconstruction PSNR" in done["summary"] and done["video"].endswith("reconstruction.mp4")
    assert shlex.split(done["command"]) == ["vd", "invert", ws, "--prompt", "a red disc", "--subject", "red disc",
                                            "--model", "tiny", "--steps", "2", "--null-steps", "1", "--device",
                                            "cpu"]
    assert loads == ["tiny"]  # loaded once, kept for the resume and the edit

    with studio.board.run("invert", "elsewhere"):  # another tab's job: refused at once, never queued
        with pytest.raises(InputError, match="busy: invert on elsewhere"):
            studio.edit(ws, "a blue disc")
        assert studio.status().startswith("running: invert on elsewhere")

    edited = studio.edit(ws, "a blue disc")
    assert edited["name"] == "blue" and edited["video"].endswith("edits/blue/edit.mp4")
    assert shlex.split(edited["command"]) == ["vd", "edit", ws, "--prompt", "a blue disc", "--device", "cpu"]
    from stages.io.video import probe

    assert probe(edited["side_by_side"]).size[1] > 2 * 64  # source | edit
    assert not edited["side_by_side"].startswith(str(root))  # the player's video is not written into ROOT
    with pytest.raises(UsageError, match="not both"):
        studio.edit(ws, "a tiger", regions={"disc": "a tiger"})
    scores = studio.evaluate(ws, "blue")
    table = dict(scores["rows"])
    assert float(table["m.P: PSNR unedited ↑"]) > 0 and table["CLIP score ↑"].startswith("n/a")
    assert studio.defaults(ws)["edits"] == ["blue"] and loads == ["tiny"]


# ------------------------------------------------------------------------------------------ API
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_named_api_endpoints_with_gradio_client(root, loads):
    pytest.importorskip("gradio")
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from vdcli.ui.page import build

    studio = Studio(root, model="tiny", device="cpu", sam2="random")
    page = build(studio, max_upload=2**20)
    page.queue(default_concurrency_limit=None)
    _, url, _ = page.launch(server_port=_free_port(), prevent_thread_lock=True, quiet=True, ssr_mode=False,
                            allowed_paths=[str(root)])
    try:
        client = Client(url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {name: [p["parameter_name"] for p in e["parameters"]] for name, e in api.items()} == {
            "/open": ["clip", "frames", "size", "start"], "/track": ["workspace", "objects", "box_only"],
            "/invert": ["workspace", "prompt", "subject", "method", "steps", "null_steps"],
            "/edit": ["workspace", "prompt", "name"], "/export": ["workspace", "name"]}
        ws = client.predict(clip="disc.mp4", frames="4", size="64", start=0, api_name="/open")
        assert ws == str(root / "disc.vd")
        preview = client.predict(workspace=ws, objects=json.dumps(DISC), box_only=True, api_name="/track")
        assert preview.endswith("preview.gif")
        summary = client.predict(workspace=ws, prompt="a red disc", subject="red disc", method="null-text",
                                 steps=2, null_steps=1, api_name="/invert")
        assert "reconstruction PSNR" in summary
        video = client.predict(workspace=ws, prompt="a blue disc", name="tint", api_name="/edit")
        assert video.endswith("edit.mp4") and Workspace.open(ws).group_attrs("edits/tint")["status"] == "done"
        with pytest.raises(AppError) as refused:
            client.predict(workspace="../../etc", prompt="x", name="", api_name="/edit")
        assert "outside the page's root" in str(refused.value) and "Traceback" not in str(refused.value)
        with pytest.raises(AppError, match="has no edit .nope."):
            client.predict(workspace=ws, name="nope", api_name="/export")
        exported = client.predict(workspace=ws, name="tint", api_name="/export")
        assert exported.endswith("export.mp4")
        assert (root / "disc.vd" / "edits" / "tint" / "export.mp4").is_file()
    finally:
        page.close()
