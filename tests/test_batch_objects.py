"""`vd batch` manifests with named objects (`objects:`) and per-region edits (`regions:`): parsing and
one-line errors (no model), and one tiny local batch (4 frames, 64 px, 2 steps) where SAM2 is a stub that
gives each object its box, so no SAM2 weights are needed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from stages.batch.manifest import validate_manifest
from stages.common.errors import InputError

PROMPT = "a red disc and a blue disc on a grey background"
OBJECTS = [{"name": "left", "phrase": "red disc", "box": [4, 16, 30, 48]},
           {"name": "right", "phrase": "blue disc", "box": [34, 16, 60, 48]}]


def manifest(edits: list, objects: list | None = None, **clip) -> dict:
    entry = {"clip": "clips/a.mp4", "prompt": PROMPT, "mask": {"objects": objects or OBJECTS}, "edits": edits}
    return {"defaults": {"size": 64, "frames": 4}, "clips": [{**entry, **clip}]}


def plan(data: dict, tmp_path: Path):
    return validate_manifest(data, tmp_path / "m.yaml").clips[0]


def test_objects_and_region_edits_are_planned(tmp_path):
    p = plan(manifest(["a green ball and a blue disc on a grey background",
                       {"regions": {"left": "a green cube", "right": "yellow ball"}},
                       {"regions": {"right": "cat"}, "name": "robodog"}]), tmp_path)
    assert [o["name"] for o in p.mask.objects] == ["left", "right"] and p.mask.subject is None
    assert p.edits[1].regions == {"left": "a green cube", "right": "yellow ball"} and p.edits[1].prompt == ""
    # default names as vd edit chooses them: from the words the regions change
    assert p.edit_names == ["green-ball", "green-cube-yellow-ball", "robodog"]
    assert p.edits[2].regions == {"right": "cat"}


def test_objects_as_a_clip_key_with_points_and_a_phrase_override(tmp_path):
    objects = [{"name": "left=red disc", "points": [[16, 32], [40, 32, 0]]}, {"name": "right", "box": "34,16,60,48",
                                                                                "phrase": "blue disc"}]
    data = manifest([{"regions": {"left": "tiger"}}], objects=objects)
    data["clips"][0]["objects"] = data["clips"][0].pop("mask")["objects"]
    p = plan(data, tmp_path)
    assert p.mask.objects[0]["points"] == [[16, 32], [40, 32, 0]] and p.edit_names == ["tiger"]
    # an edit may name an object's source phrase itself (vd edit --object)
    q = plan(manifest([{"regions": {"left": "tiger"}, "objects": {"left": "red"}}], objects=[
        {"name": "left", "box": [4, 16, 30, 48]}]), tmp_path)
    assert q.edit_names == ["tiger"] and q.edits[0].objects == {"left": "red"}


def test_single_object_is_named_after_the_subject(tmp_path):
    data = {"clips": [{"clip": "a.mp4", "prompt": PROMPT, "subject": "red disc", "size": 64, "frames": 4,
                       "box": [4, 16, 30, 48], "box_only": True, "edits": [{"regions": {"red_disc": "a cat"}}]}]}
    p = plan(data, tmp_path)
    assert p.mask.subject == "red disc" and p.edit_names == ["cat"]


@pytest.mark.parametrize("edits, objects, match", [
    ([{"regions": {"left": "cat"}}], [{"name": "left", "colour": "red", "box": [4, 16, 30, 48]}],
     "clips[0]: objects[0]: unknown key 'colour'"),
    ([], [{"name": "left"}], "clips[0]: object 'left' has no --point, --box or --text"),
    ([], [OBJECTS[0], {"name": "right", "box": [34, 16, 90, 48]}], "clips[0]: object 'right': --box 34,16,90,48 "
                                                                     "is outside the 64x64"),
    ([], [{"name": "left", "points": [[16, 70]]}], "clips[0]: --point 16,70 is outside"),
    ([], [{"name": "a", "box": [4, 4, 9, 9]}, {"name": "a", "box": [9, 9, 20, 20]}], "duplicate object name 'a'"),
    ([{"regions": {"dog": "cat"}}], None, "clips[0], edits[0]: regions: unknown object 'dog'; this clip's "
                                          "objects are left, right"),
    ([{"regions": {"left": "cat"}, "prompt": "a cat"}], None, "clips[0], edits[0]: give `prompt:` or `regions:`"),
    ([{"regions": ["left=cat"]}], None, "clips[0], edits[0]: `regions:` must map object names"),
    ([{"regions": {}}], None, "clips[0], edits[0]: `regions:` must map"),
    ([{"regions": {"left": "cat"}, "objects": {"left": "green disc"}}], None, "not in the inversion prompt"),
    ([{"regions": {"left": "cat", "right": "dog"}, "objects": {"right": "red disc"}}], None, "the same words"),
    ([{"regions": {"left": "cat"}, "blend": ["cat"]}], None, "clips[0], edits[0]: --blend cannot be combined"),
    ([{"regions": {"left": "cat"}}, {"regions": {"left": "a cat"}}], None, "duplicate edit name 'cat'"),
])
def test_bad_objects_and_regions_are_one_line_manifest_errors(tmp_path, edits, objects, match):
    with pytest.raises(InputError) as err:
        plan(manifest(edits, objects), tmp_path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"manifest {tmp_path / 'm.yaml'}: clips[0]") and match in text


def test_region_without_phrase_names_the_object(tmp_path):
    with pytest.raises(InputError, match=r"clips\[0\], edits\[0\]: regions: object 'left' has no source phrase"):
        plan(manifest([{"regions": {"left": "cat"}}], [{"name": "left", "box": [4, 16, 30, 48]}]), tmp_path)


# ----------------------------------------------------------------------------------------- one local batch
RUN = """\
defaults:
  model: tiny
  frames: 4
  size: 64
  invert: {steps: 2, null_steps: 1}
clips:
  - clip: clips/two.mp4
    prompt: "a red disc and a blue disc on a grey background"
    mask:
      sam2: random
      objects:
        - {name: left, phrase: red disc, box: [2, 16, 30, 48]}
        - {name: right, phrase: blue disc, box: [34, 16, 62, 48]}
    edits: [{regions: {left: a green cube, right: yellow ball}, name: cubeball}]
"""


def box_tracker(calls: list):
    """sam2_track.track_objects stand-in: each object's mask is its box on every frame (as --box-only)."""
    from stages.mask.run import box_mask

    def track_objects(predictor, frames, prompts, prompt_frame=0, progress=None):
        calls.append(len(prompts))
        count, height, width = frames.shape[:3]
        masks = np.stack([box_mask(box, count, height, width) for _points, box in prompts]).astype(np.uint8)
        return masks, np.zeros((len(prompts), len(prompts)), np.int64)
    return track_objects


def test_local_batch_with_two_objects_and_a_region_edit(tmp_path, monkeypatch):
    from stages.io.synthetic import two_discs
    from stages.io.video import write_mp4
    from stages.io.workspace import Workspace
    from stages.models import sam2_track
    from vdcli.app import app

    (tmp_path / "clips").mkdir()
    write_mp4(tmp_path / "clips" / "two.mp4", two_discs(4, 64, 64, seed=1)[0], fps=8.0)
    (tmp_path / "m.yaml").write_text(RUN)
    calls: list[int] = []
    monkeypatch.setattr(sam2_track, "load_predictor", lambda *a, **k: SimpleNamespace(device="cpu"))
    monkeypatch.setattr(sam2_track, "track_objects", box_tracker(calls))
    r = CliRunner().invoke(app, ["batch", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "out"),
                                 "--workers", "1", "--threads-per-worker", "1", "-q", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["counts"]["done"] == 1 and calls == [2]  # both objects in one tracking call
    ws = Workspace.open(tmp_path / "out" / "two.vd")
    left, right = (np.asarray(ws.read(f"masks/objects/{n}/raw")) for n in ("left", "right"))
    assert left.shape == (4, 64, 64) and left[:, 32, 10].all() and right[:, 32, 50].all()
    assert not (left & right).any() and np.array_equal(np.asarray(ws.read("masks/raw")), left | right)
    attrs = ws.group_attrs("edits/cubeball")
    assert attrs["status"] == "done" and attrs["mode"] == "regions"
    assert attrs["params"]["regions"] == {"left": "a green cube", "right": "yellow ball"}
    assert attrs["resolved_prompt"] == "a green cube and a yellow ball on a grey background"
    assert ws.read("edits/cubeball/frames").shape == (4, 64, 64, 3)
