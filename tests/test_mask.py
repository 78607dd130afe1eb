"""Stage `vd mask`: imported masks line up with the frames, workspace attrs, reuse rules, SAM2 plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.io import video as vid
from stages.common.errors import InputError, UsageError
from stages.mask.run import MaskConfig, import_mask_dir, import_mask_video, run_mask
from stages.io.synthetic import moving_disc
from stages.io.workspace import Workspace

SOURCE_FRAMES, SRC_H, SRC_W = 12, 96, 128


@pytest.fixture(scope="module")
def disc():
    return moving_disc(SOURCE_FRAMES, SRC_H, SRC_W, seed=3)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory, disc):
    return vid.write_mp4(tmp_path_factory.mktemp("clip") / "disc.mp4", disc[0], 24)


def write_pngs(folder: Path, masks: np.ndarray, value: int = 255) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        Image.fromarray((mask * value).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def expected_masks(disc, indices, size=64, mode="crop"):
    return vid.resize_frames(disc[1][indices], (size, size), mode, nearest=True)


def test_mask_dir_one_per_sampled_frame_and_one_per_source_frame(tmp_path, clip_path, disc):
    clip = vid.load_clip(clip_path, frames=4, size="64", start=1, stride=3)
    indices = clip.source["indices"]
    assert indices == [1, 4, 7, 10]
    per_sample = import_mask_dir(write_pngs(tmp_path / "sampled", disc[1][indices], value=1), clip)
    np.testing.assert_array_equal(per_sample, expected_masks(disc, indices))
    per_source = import_mask_dir(write_pngs(tmp_path / "all", disc[1]), clip)  # 12 masks: pick 1, 4, 7, 10
    np.testing.assert_array_equal(per_source, expected_masks(disc, indices))
    at_output = write_pngs(tmp_path / "out", expected_masks(disc, indices))  # already output-sized
    np.testing.assert_array_equal(import_mask_dir(at_output, clip), expected_masks(disc, indices))


def test_mask_dir_pad_mode_uses_the_same_geometry(tmp_path, clip_path, disc):
    clip = vid.load_clip(clip_path, frames=2, size="64", resize="pad")
    masks = import_mask_dir(write_pngs(tmp_path / "m", disc[1][:2]), clip)
    np.testing.assert_array_equal(masks, expected_masks(disc, [0, 1], mode="pad"))
    assert masks[:, :8].sum() == 0  # the black bars carry no mask


def test_mask_dir_mismatches_are_refused(tmp_path, clip_path, disc):
    clip = vid.load_clip(clip_path, frames=4, size="64")
    with pytest.raises(InputError, match="has 5 PNGs; expected 4 .* or 12"):
        import_mask_dir(write_pngs(tmp_path / "five", disc[1][:5]), clip)
    wrong = write_pngs(tmp_path / "wrong", np.ones((4, 50, 50), np.uint8))
    with pytest.raises(InputError, match="50x50"):
        import_mask_dir(wrong, clip)
    with pytest.raises(InputError, match="not found"):
        import_mask_dir(tmp_path / "missing", clip)


def test_mask_video_is_sampled_like_the_clip(tmp_path, clip_path, disc):
    mask_rgb = np.repeat(disc[1][..., None] * 255, 3, axis=-1).astype(np.uint8)
    mask_video = vid.write_mp4(tmp_path / "mask.mp4", mask_rgb, 24)
    clip = vid.load_clip(clip_path, frames=3, size="64", stride=4)
    masks = import_mask_video(mask_video, clip)
    expected = expected_masks(disc, [0, 4, 8]).astype(bool)
    iou = (masks.astype(bool) & expected).sum() / (masks.astype(bool) | expected).sum()
    assert masks.shape == (3, 64, 64) and iou > 0.95
    short = vid.write_mp4(tmp_path / "short.mp4", mask_rgb[:5], 24)
    with pytest.raises(InputError, match="has 5 frames"):
        import_mask_video(short, clip)


def test_run_mask_writes_frames_masks_attrs_and_preview(tmp_path, clip_path, disc):
    masks_dir = write_pngs(tmp_path / "m", disc[1])
    config = MaskConfig(frames=4, size="64", stride=2, mask_dir=str(masks_dir))
    result = run_mask(clip_path, tmp_path / "ws", config)
    ws = Workspace.open(tmp_path / "ws")
    source = ws.attrs["source"]
    assert source["indices"] == [0, 2, 4, 6] and source["fps"] == 24.0 and source["fps_out"] == 12.0
    assert source["size"] == [64, 64] and source["frames"] == 4 and source["stride"] == 2
    assert source["path"] == str(Path(clip_path).resolve()) and len(source["sha256"]) == 64
    frames, raw, edit = ws.read("video/frames"), ws.read("masks/raw"), ws.read("masks/edit")
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(raw, expected_masks(disc, [0, 2, 4, 6]))
    assert edit.dtype == np.uint8 and (edit >= raw).all()
    attrs = ws.group_attrs("masks")
    assert attrs["method"] == "mask-dir" and attrs["ellipse"] is True
    assert attrs["coverage_raw"] == result["mask"]["coverage_raw"]
    assert result["workspace"] == str((tmp_path / "ws").resolve())
    with Image.open(ws.file_path("masks/preview.gif")) as gif:
        assert gif.n_frames == 4 and gif.size == (64, 64)
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in (tmp_path / "ws" / "masks").iterdir())
    plain = run_mask(clip_path, tmp_path / "ws2", MaskConfig(frames=4, size="64", stride=2,
                                                             mask_dir=str(masks_dir), ellipse=False))
    ws2 = Workspace.open(plain["workspace"])
    np.testing.assert_array_equal(ws2.read("masks/edit"), ws2.read("masks/raw"))


def test_rerun_on_same_clip_keeps_later_stages_but_changed_frames_need_force(tmp_path, clip_path, disc):
    masks_dir = write_pngs(tmp_path / "m", disc[1])
    config = MaskConfig(frames=4, size="64", mask_dir=str(masks_dir))
    run_mask(clip_path, tmp_path / "ws", config)
    ws = Workspace.open(tmp_path / "ws")
    ws.update_attrs("inversion", status="done", prompt="a red disc")
    run_mask(clip_path, tmp_path / "ws", MaskConfig(frames=4, size="64", mask_dir=str(masks_dir), ellipse=False))
    assert ws.group_attrs("inversion")["prompt"] == "a red disc"  # same frames: later stages untouched
    np.testing.assert_array_equal(ws.read("masks/edit"), ws.read("masks/raw"))
    changed = MaskConfig(frames=3, size="64", mask_dir=str(masks_dir))
    with pytest.raises(InputError, match="--force"):
        run_mask(clip_path, tmp_path / "ws", changed)
    assert ws.has("inversion") and ws.read("video/frames").shape[0] == 4  # nothing was touched
    changed.force = True
    run_mask(clip_path, tmp_path / "ws", changed)
    assert not ws.has("inversion") and ws.read("video/frames").shape[0] == 3


def test_box_only_and_sam2_random(tmp_path, clip_path):
    boxed = run_mask(clip_path, tmp_path / "box", MaskConfig(frames=3, size="64", box="10,12,30,40",
                                                              box_only=True, ellipse=False))
    raw = Workspace.open(boxed["workspace"]).read("masks/raw")
    assert raw.sum() == 3 * 20 * 28 and raw[:, 12:40, 10:30].all()
    tracked = run_mask(clip_path, tmp_path / "sam", MaskConfig(frames=3, size="64",
                                                               box="10,10,50,50", sam2="random", prompt_frame=1))
    ws = Workspace.open(tracked["workspace"])
    assert ws.read("masks/raw").shape == (3, 64, 64) and ws.group_attrs("masks")["method"] == "sam2"
    assert ws.group_attrs("masks")["prompt_frame"] == 1


def test_option_and_prompt_errors(tmp_path, clip_path, disc):
    def go(**kw):
        return run_mask(clip_path, tmp_path / "ws", MaskConfig(frames=3, size="64", **kw))

    with pytest.raises(UsageError, match="no mask source"):
        go()
    with pytest.raises(UsageError):
        go(mask_dir="a", mask_video="b")
    with pytest.raises(UsageError):
        go(box_only=True)
    with pytest.raises(InputError, match="outside"):
        go(points=["64,10"], sam2="random")
    with pytest.raises(InputError, match="outside"):
        go(box="0,0,65,20", box_only=True)
    empty = write_pngs(tmp_path / "empty", np.zeros((SOURCE_FRAMES, SRC_H, SRC_W), np.uint8))
    with pytest.raises(InputError, match="frame 0 is empty"):
        go(mask_dir=str(empty))
    assert not (tmp_path / "ws").exists()  # every failure above happened before the workspace existed


def test_image_folder_and_gif_clips(tmp_path, disc):
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, frame in enumerate(disc[0]):
        Image.fromarray(frame).save(frames_dir / f"img_{i}.png")
    masks_dir = write_pngs(tmp_path / "m", disc[1])
    result = run_mask(frames_dir, tmp_path / "ws", MaskConfig(frames=3, size="64", stride=5, mask_dir=str(masks_dir)))
    ws = Workspace.open(result["workspace"])
    assert ws.attrs["source"]["kind"] == "folder" and ws.attrs["source"]["indices"] == [0, 5, 10]
    np.testing.assert_array_equal(ws.read("video/frames"), vid.resize_frames(disc[0][[0, 5, 10]], (64, 64)))
    np.testing.assert_array_equal(ws.read("masks/raw"), expected_masks(disc, [0, 5, 10]))
    gif = vid.write_gif(tmp_path / "clip.gif", disc[0], 10)
    result = run_mask(gif, tmp_path / "ws_gif", MaskConfig(frames=4, size="64", sample="uniform",
                                                          mask_dir=str(masks_dir)))
    assert result["indices"] == [0, 3, 6, 9] and result["fps_out"] == pytest.approx(10 / 3)


def test_mask_preview_outlines_the_mask_in_white_whatever_the_object_colour():
    from stages.mask.run import preview_frames

    frames = np.zeros((1, 32, 32, 3), np.uint8)
    frames[..., 0] = 255  # a red scene: a red tint would be invisible
    raw = np.zeros((1, 32, 32), np.uint8)
    raw[0, 8:24, 8:24] = 1
    out = preview_frames(frames, raw, raw)
    assert (out[0, 8, 8:24] == 255).all()  # boundary row is white
    assert not (out[0, 16, 16] == 255).all() and out[0, 16, 16, 2] > 100  # interior tinted blue
    assert (out[0, 0, 0] == frames[0, 0, 0]).all()  # outside untouched
