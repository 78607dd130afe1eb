"""Named objects in `vd mask`: prompts by box, points and text, one SAM2 propagation for all of them,
per-object masks and their union, overlaps resolved by SAM2's logits and reported.

SAM2 is the real predictor class (random weights) with its networks replaced by a stub that "segments" the
pixels of the colour under each object's prompt, widened by a few pixels, as logits that fall with the
distance from that colour; two discs that come close then overlap in the gap, and the nearer disc's logit
is the higher one there. The detector is a tiny random Grounding DINO built from its config.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_erosion, distance_transform_edt

from stages.common.errors import InputError, ModelMissingError, UsageError
from stages.io import video as vid
from stages.io.synthetic import two_discs
from stages.io.workspace import Workspace
from stages.mask import objects as obj
from stages.mask.preview import colour
from stages.mask.run import MaskConfig, run_mask
from stages.mask.text import assign_boxes
from stages.models import detector as det
from stages.models import sam2_track

FRAMES, SIZE, PROMPT_FRAME = 4, 64, 2
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@pytest.fixture(scope="module")
def discs():
    """The clip (red disc left, blue disc right, 2 px apart on the last frame) and its ground truth."""
    return two_discs(FRAMES, SIZE, SIZE, seed=1, gap=2)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, discs):
    folder = tmp_path_factory.mktemp("two")
    for k, frame in enumerate(discs[0]):  # PNG frames: lossless, so the colours are exact
        Image.fromarray(frame).save(folder / f"{k:02d}.png")
    return folder


@pytest.fixture(scope="module")
def predictor():
    return sam2_track.load_predictor(None, "cpu")


class ColourStub:
    """The image encoder, SAM heads and memory encoder of one predictor, stubbed; counts SAM2's calls."""

    def __init__(self, predictor, monkeypatch):
        self.size = predictor.image_size
        self.images: dict[int, torch.Tensor] = {}
        self.prompts: list[tuple[int, np.ndarray, np.ndarray]] = []  # object index, coords (model px), labels
        self.colours: dict[int, torch.Tensor] = {}
        self.logits: dict[tuple[int, int], np.ndarray] = {}  # (object, frame) -> low-res logits
        self.calls = {"init_state": 0, "add": [], "propagate": 0}
        self.state = None
        init, add, propagate = predictor.init_state, predictor.add_new_points_or_box, predictor.propagate_in_video

        def spy_init(*args, **kwargs):
            self.calls["init_state"] += 1
            self.state = init(*args, **kwargs)
            return self.state

        def spy_add(state, frame_idx, obj_id, **kwargs):
            self.calls["add"].append((frame_idx, obj_id))
            return add(state, frame_idx=frame_idx, obj_id=obj_id, **kwargs)

        def spy_propagate(*args, **kwargs):
            self.calls["propagate"] += 1
            yield from propagate(*args, **kwargs)

        monkeypatch.setattr(predictor, "init_state", spy_init)
        monkeypatch.setattr(predictor, "add_new_points_or_box", spy_add)
        monkeypatch.setattr(predictor, "propagate_in_video", spy_propagate)
        monkeypatch.setattr(predictor, "_get_image_feature", self.image_feature)
        monkeypatch.setattr(predictor, "track_step", self.track_step)
        monkeypatch.setattr(predictor, "_encode_new_memory", self.encode_memory)
        monkeypatch.setattr(sam2_track, "load_predictor", lambda checkpoint, device="auto": predictor)

    def image_feature(self, state, frame_idx, batch_size):
        image = state["images"][frame_idx].float()
        self.images[frame_idx] = image.clone()
        return image[None], None, None, None, None

    def track_step(self, frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds,
                   feat_sizes, point_inputs, mask_inputs, output_dict, num_frames, track_in_reverse=False,
                   run_mem_encoder=True, prev_sam_mask_logits=None):
        index = next(k for k, d in self.state["output_dict_per_obj"].items() if d is output_dict)
        rgb = self.images[frame_idx] * STD + MEAN
        if point_inputs is not None:
            coords = point_inputs["point_coords"][0].cpu().numpy()
            labels = point_inputs["point_labels"][0].cpu().numpy()
            self.prompts.append((index, coords, labels))
            at = coords[:2].mean(0) if 2 in labels else coords[list(labels).index(1)]
            self.colours[index] = rgb[:, int(at[1]), int(at[0])].clone()
        hit = (rgb - self.colours[index][:, None, None]).abs().sum(0) < 0.3
        low = torch.nn.functional.avg_pool2d(hit[None, None].float(), 4)[0, 0] > 0.5  # 64x64 for 256 px
        logits = 8.0 - 3.0 * distance_transform_edt(~low.numpy())  # > 0 within 2.6 px of the colour
        self.logits[(index, frame_idx)] = logits
        memory = (torch.zeros(1, 1, 1, 1), [torch.zeros(1, 1, 1, 1)]) if run_mem_encoder else (None, None)
        return {"pred_masks": torch.tensor(logits, dtype=torch.float32)[None, None], "obj_ptr": torch.zeros(1, 8),
                "object_score_logits": torch.full((1, 1), 10.0), "maskmem_features": memory[0],
                "maskmem_pos_enc": memory[1]}

    def encode_memory(self, current_vision_feats, feat_sizes, pred_masks_high_res, object_score_logits,
                      is_mask_from_pts):
        return torch.zeros(1, 1, 1, 1), [torch.zeros(1, 1, 1, 1)]


def _box_of(mask: np.ndarray, pad: int = 2) -> str:
    ys, xs = np.nonzero(mask)
    return f"{xs.min() - pad},{ys.min() - pad},{xs.max() + pad + 1},{ys.max() + pad + 1}"


def _centre(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    return f"{xs.mean():.1f},{ys.mean():.1f}"


def _config(**kw) -> MaskConfig:
    return MaskConfig(frames=FRAMES, size=str(SIZE), sam2="random", device="cpu", prompt_frame=PROMPT_FRAME, **kw)


# ------------------------------------------------------------------------------------------ parsing
def test_command_line_order_groups_prompts_under_their_object():
    args = ["clip.mp4", "--frames", "4", "--object", "red=red disc", "--box", "1,2,30,40", "--point", "5,6",
            "--object=blue", "--point=50,30", "--point", "1,1,0", "--text", "blue disc", "-o", "ws"]
    groups = obj.group_object_args(args)
    assert groups == [
        {"name": "red", "phrase": "red disc", "points": ["5,6"], "box": "1,2,30,40", "text": None},
        {"name": "blue", "phrase": None, "points": ["50,30", "1,1,0"], "box": None, "text": "blue disc"}]
    assert obj.group_object_args(["--point", "5,6", "--box", "1,2,3,4"]) == []  # the single-object form
    with pytest.raises(UsageError, match="before any --object"):
        obj.group_object_args(["--point", "5,6", "--object", "a", "--box", "1,2,3,4"])
    with pytest.raises(UsageError, match="two --box"):
        obj.group_object_args(["--object", "a", "--box", "1,2,3,4", "--box", "2,3,4,5"])
    assert obj.group_object_args(["--object", "a", "--", "--point", "1,2"])[0]["points"] == []


def test_object_specs_checks_names_prompts_and_the_single_form():
    specs = obj.object_specs(_config(objects=[{"name": "bear=brown bear", "box": [1, 2, 30, 40]},
                                              {"name": "dog", "text": " small  dog ", "points": [[3, 4]]}]))
    assert [(s.name, s.phrase, s.box, s.text, s.points) for s in specs] == [
        ("bear", "brown bear", (1.0, 2.0, 30.0, 40.0), None, []), ("dog", "small dog", None, "small dog", [(3.0, 4.0, 1)])]
    single = obj.object_specs(_config(points=["3,4"], subject="brown  bear"))
    assert [(s.name, s.phrase, s.points) for s in single] == [("brown_bear", "brown bear", [(3.0, 4.0, 1)])]
    assert obj.object_specs(_config(box="1,2,3,4"))[0].name == "object"
    bad = [
        (dict(objects=[{"name": "a", "box": "1,2,3,4"}, {"name": "a", "points": ["1,2"]}]), "duplicate object name"),
        (dict(objects=[{"name": "a"}]), "has no --point, --box or --text"),
        (dict(objects=[{"name": "a", "box": "1,2,3,4"}], points=["1,2"]), "cannot be mixed"),
        (dict(objects=[{"name": "a", "box": "1,2,3,4", "text": "a"}]), "not both"),
        (dict(objects=[{"name": "a/b", "box": "1,2,3,4"}]), "no '/'"),
        (dict(objects=[{"name": "..", "box": "1,2,3,4"}]), "object name"),
        (dict(objects=[{"name": "a", "points": ["1,2,0"]}]), "only background points"),
        (dict(objects=[{"name": "a", "box": "1,2,3,4"}], subject="bear"), "--subject"),
    ]
    for kwargs, words in bad:
        with pytest.raises(UsageError, match=words):
            obj.object_specs(_config(**kwargs))


def test_resolve_overlaps_gives_each_pixel_to_the_highest_positive_logit():
    logits = np.full((3, 2, 4), -5.0, np.float32)
    logits[0, 0, :3] = [4.0, 2.0, 1.0]
    logits[1, 0, 1:4] = [3.0, 3.0, 6.0]  # overlaps object 0 on (0, 1) and (0, 2)
    logits[2, 0, 2] = 1.0  # and object 0 and 1 on (0, 2)
    logits[2, 1, 0] = 0.5
    owner, pairs = sam2_track.resolve_overlaps(logits)
    assert owner.tolist() == [[1, 2, 2, 2], [3, 0, 0, 0]]
    assert pairs.tolist() == [[0, 2, 1], [0, 0, 1], [0, 0, 0]]
    tie = np.array([[[2.0]], [[2.0]]], np.float32)
    assert sam2_track.resolve_overlaps(tie)[0].tolist() == [[1]]  # ties: the earlier object


# ------------------------------------------------------------------------------------------ SAM2
@pytest.mark.parametrize("by", ["box", "points"])
def test_two_objects_one_propagation_disjoint_masks_union_and_overlaps(predictor, clip, discs, tmp_path,
                                                                       monkeypatch, by):
    frames, truth = discs
    stub = ColourStub(predictor, monkeypatch)
    red, blue = truth[0, PROMPT_FRAME], truth[1, PROMPT_FRAME]
    if by == "box":
        prompts = [{"name": "red=red disc", "box": _box_of(red)}, {"name": "blue", "box": _box_of(blue)}]
    else:
        prompts = [{"name": "red=red disc", "points": [_centre(red), "2,2,0"]},
                   {"name": "blue", "points": [_centre(blue)]}]
    result = run_mask(clip, tmp_path / "ws", _config(objects=prompts))
    ws = Workspace.open(result["workspace"])
    assert np.array_equal(ws.read("video/frames"), frames)

    # one SAM2 state, one prompt per object on the prompt frame, one pass each way for all objects together
    assert stub.calls["init_state"] == 1 and stub.calls["propagate"] == 2
    assert stub.calls["add"] == [(PROMPT_FRAME, 1), (PROMPT_FRAME, 2)]
    scale = predictor.image_size / SIZE
    for (index, coords, labels), entry in zip(stub.prompts, prompts):
        if by == "box":
            x0, y0, x1, y1 = (float(v) for v in entry["box"].split(","))
            np.testing.assert_allclose(coords, np.array([[x0, y0], [x1, y1]]) * scale, rtol=1e-5)
            assert labels.tolist() == [2, 3]
        else:
            pts = [[float(v) for v in p.split(",")] for p in entry["points"]]
            np.testing.assert_allclose(coords, np.array([p[:2] for p in pts]) * scale, rtol=1e-5)
            assert labels.tolist() == [int(p[2]) if len(p) == 3 else 1 for p in pts]
    assert [p[0] for p in stub.prompts] == [0, 1]

    attrs = ws.group_attrs("masks/objects")
    assert attrs["names"] == ["red", "blue"] and attrs["phrases"] == {"red": "red disc", "blue": None}
    raws = np.stack([ws.read(f"masks/objects/{n}/raw") for n in attrs["names"]])
    edits = np.stack([ws.read(f"masks/objects/{n}/edit") for n in attrs["names"]])
    assert raws.dtype == np.uint8 and raws.shape == (2, FRAMES, SIZE, SIZE) and set(np.unique(raws)) == {0, 1}
    assert not (raws[0] & raws[1]).any()  # resolved: each pixel belongs to at most one object
    np.testing.assert_array_equal(ws.read("masks/raw"), raws.max(0))
    np.testing.assert_array_equal(ws.read("masks/edit"), edits.max(0))
    assert (edits >= raws).all()

    # each object follows its own disc on every frame and never takes the other disc
    for k in range(2):
        core = np.stack([binary_erosion(m, iterations=1) for m in truth[k]])
        other = np.stack([binary_erosion(m, iterations=1) for m in truth[1 - k]])
        assert raws[k][core].all() and not raws[k][other].any(), k

    # the overlap before resolution (both logits > 0), per frame once, and who got it (the higher logit)
    expected = 0
    for f in range(FRAMES):
        a, b = stub.logits[(0, f)], stub.logits[(1, f)]
        both = (a > 0) & (b > 0)
        expected += int(both.sum())
        assert (raws[0, f][both] == (a >= b)[both]).all() and (raws[1, f][both] == (b > a)[both]).all()
    a, b = stub.logits[(0, PROMPT_FRAME)], stub.logits[(1, PROMPT_FRAME)]
    assert ((a > 0) & (b > 0)).any()  # they overlap on the prompt frame too (visited in both directions)
    assert attrs["overlap_pixels"] == {"red|blue": expected} == result["overlap_pixels"]
    assert attrs["coverage"] == {n: round(float(raws[k].mean()), 5) for k, n in enumerate(attrs["names"])}
    assert [o["name"] for o in result["objects"]] == ["red", "blue"]

    # preview: each object tinted half-way to its own palette colour (the names drawn over a few pixels)
    with Image.open(ws.file_path("masks/preview.gif")) as gif:
        gif.seek(PROMPT_FRAME)
        shown = np.asarray(gif.convert("RGB")).astype(float)
    for k in range(2):
        inner = binary_erosion(truth[k, PROMPT_FRAME], iterations=3)
        tinted = 0.5 * frames[PROMPT_FRAME][inner] + 0.5 * np.asarray(colour(k))
        assert np.median(np.abs(shown[inner] - tinted).max(axis=1)) < 12, k
    assert colour(0) != colour(1)


def test_a_rerun_replaces_the_objects_and_a_single_object_run_names_its_object(predictor, clip, discs, tmp_path,
                                                                               monkeypatch):
    truth = discs[1]
    ColourStub(predictor, monkeypatch)
    two = [{"name": "red", "box": _box_of(truth[0, PROMPT_FRAME])}, {"name": "blue", "box": _box_of(truth[1, PROMPT_FRAME])}]
    run_mask(clip, tmp_path / "ws", _config(objects=two))
    ColourStub(predictor, monkeypatch)
    run_mask(clip, tmp_path / "ws", _config(points=[_centre(truth[1, PROMPT_FRAME])], subject="blue disc",
                                            ellipse=False))
    ws = Workspace.open(tmp_path / "ws")
    attrs = ws.group_attrs("masks/objects")
    assert attrs["names"] == ["blue_disc"] and attrs["phrases"] == {"blue_disc": "blue disc"}
    assert attrs["overlap_pixels"] == {} and not ws.has("masks/objects/red")
    raw = ws.read("masks/objects/blue_disc/raw")
    np.testing.assert_array_equal(raw, ws.read("masks/raw"))
    np.testing.assert_array_equal(ws.read("masks/objects/blue_disc/edit"), raw)  # --no-ellipse: edit == raw


def test_an_object_that_loses_its_whole_prompt_frame_mask_is_refused(predictor, clip, discs, tmp_path, monkeypatch):
    ColourStub(predictor, monkeypatch)
    box = _box_of(discs[1][0, PROMPT_FRAME])
    with pytest.raises(InputError, match="'second' is empty on frame 2.*'first' scored higher"):
        run_mask(clip, tmp_path / "ws", _config(objects=[{"name": "first", "box": box}, {"name": "second", "box": box}]))
    assert not (tmp_path / "ws").exists()


# ------------------------------------------------------------------------------------------ text
@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return det.save_random_detector(tmp_path_factory.mktemp("gdino"), ["red", "blue", "disc", "ball"])


def test_the_random_detector_runs_and_scores_only_the_phrase_tokens(detector_dir, discs, monkeypatch):
    model = det.load_detector(detector_dir, "cpu")
    image = discs[0][0]
    found = det.detect(model, image, "Red disc")  # the real forward pass of the tiny network
    assert found and all(0 <= d.score <= 1 for d in found)
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    assert all(0 <= d.box[0] < d.box[2] <= SIZE and 0 <= d.box[1] < d.box[3] <= SIZE for d in found)

    # a known output: query 2 fires on 'disc' (token 2), query 5 only on [CLS] / '.' / [SEP] (not the phrase)
    queries, tokens = 12, 32
    logits = torch.full((1, queries, tokens), -9.0)
    logits[0, 2, 2] = 2.0
    logits[0, 5, [0, 3, 4]] = 9.0
    boxes = torch.full((1, queries, 4), 0.1)
    boxes[0, 2] = torch.tensor([0.5, 0.25, 0.5, 0.25])  # cx, cy, w, h
    monkeypatch.setattr(model.model, "forward", lambda **kw: SimpleNamespace(logits=logits, pred_boxes=boxes))
    best = det.detect(model, np.zeros((40, 80, 3), np.uint8), "red disc")[0]
    assert best.box == pytest.approx((20.0, 5.0, 60.0, 15.0)) and best.score == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))))
    with pytest.raises(UsageError, match="vocabulary"):
        det.detect(model, image, "zebra")


def test_text_boxes_reach_sam2_and_phrases_default_to_the_text(predictor, clip, discs, detector_dir, tmp_path,
                                                               monkeypatch):
    truth = discs[1]
    boxes = {"red disc": tuple(float(v) for v in _box_of(truth[0, PROMPT_FRAME]).split(",")),
             "blue disc": tuple(float(v) for v in _box_of(truth[1, PROMPT_FRAME]).split(","))}
    seen: list[tuple[str, tuple[int, ...]]] = []

    def fake_detect(model, image, phrase, limit=8):
        assert isinstance(model, det.Detector) and model.source == str(detector_dir)  # loaded from the folder
        seen.append((phrase, image.shape))
        np.testing.assert_array_equal(image, discs[0][PROMPT_FRAME])  # the prompt frame
        return [det.Detection(boxes[phrase], 0.9)]

    monkeypatch.setattr(det, "detect", fake_detect)
    stub = ColourStub(predictor, monkeypatch)
    objects = [{"name": "red", "text": "red disc"}, {"name": "blue=blue ball", "text": "blue disc"}]
    result = run_mask(clip, tmp_path / "ws", _config(objects=objects, detector=str(detector_dir)))
    assert seen == [("red disc", (SIZE, SIZE, 3)), ("blue disc", (SIZE, SIZE, 3))]
    scale = predictor.image_size / SIZE
    for (index, coords, labels), phrase in zip(stub.prompts, ["red disc", "blue disc"]):
        x0, y0, x1, y1 = boxes[phrase]
        np.testing.assert_allclose(coords, np.array([[x0, y0], [x1, y1]]) * scale, rtol=1e-5)
        assert labels.tolist() == [2, 3]
    ws = Workspace.open(result["workspace"])
    assert ws.group_attrs("masks/objects")["phrases"] == {"red": "red disc", "blue": "blue ball"}
    assert [o["score"] for o in result["objects"]] == [0.9, 0.9]
    assert ws.group_attrs("masks")["objects"][0]["text"] == "red disc"


def test_same_phrase_objects_take_different_boxes_and_points_pick_one():
    a, b = det.Detection((0, 0, 10, 10), 0.9), det.Detection((20, 0, 30, 10), 0.8)
    specs = [obj.ObjectSpec("left", text="dog"), obj.ObjectSpec("right", text="dog")]
    assert assign_boxes(specs, {"dog": [a, b]}, 0.3, 0) == {"left": a, "right": b}
    picked = assign_boxes([obj.ObjectSpec("right", points=[(25.0, 5.0, 1)], text="dog")], {"dog": [a, b]}, 0.3, 0)
    assert picked == {"right": b}
    with pytest.raises(InputError, match="taken by other objects"):
        assign_boxes(specs + [obj.ObjectSpec("third", text="dog")], {"dog": [a, b]}, 0.3, 0)


def test_a_text_below_the_threshold_or_without_weights_writes_nothing(clip, detector_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(det, "detect", lambda model, image, phrase, limit=8: [det.Detection((1, 1, 20, 20), 0.12)])
    config = _config(objects=[{"name": "cat", "text": "cat"}], detector=str(detector_dir))
    with pytest.raises(InputError, match=r"--text 'cat' \(object 'cat'\).*score >= 0.3 \(best 0.12\)"):
        run_mask(clip, tmp_path / "ws", config)
    assert not (tmp_path / "ws").exists()
    monkeypatch.setenv(det.ENV_DETECTOR, str(tmp_path / "nothing"))
    decoded = []
    monkeypatch.setattr(vid, "load_clip", lambda *a, **k: decoded.append(1))
    with pytest.raises(ModelMissingError, match="vd models --get grounding-dino"):
        run_mask(clip, tmp_path / "ws", _config(text="cat"))
    assert not decoded and not (tmp_path / "ws").exists()  # refused before decoding
    with pytest.raises(InputError, match="not a Grounding DINO folder"):
        run_mask(clip, tmp_path / "ws", _config(text="cat", detector=str(tmp_path)))
