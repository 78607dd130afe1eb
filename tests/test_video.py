"""Video in/out: decoding every common container, frame selection, resize geometry, atomic writers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from stages.io import video as vid
from stages.common.errors import InputError, UsageError
from stages.io.synthetic import moving_disc


def write_with_pyav(path: Path, frames: np.ndarray, fps: int, codec: str, pix_fmt: str) -> Path:
    """An independent writer (not stages.io.video) so decoding is tested against other encoders too."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip():
    return moving_disc(10, 48, 80, seed=1)


@pytest.mark.parametrize("ext,codec,pix_fmt", [("mp4", "libx264", "yuv420p"), ("mov", "libx264", "yuv420p"),
                                               ("mkv", "libx264", "yuv420p"), ("webm", "libvpx-vp9", "yuv420p"),
                                               ("gif", "gif", "rgb8")])
def test_every_common_container_decodes_to_the_source_frames(tmp_path, clip, ext, codec, pix_fmt):
    video, _ = clip
    path = write_with_pyav(tmp_path / f"c.{ext}", video, 10, codec, pix_fmt)
    info = vid.probe(path)
    assert info.size == (48, 80) and abs(info.fps - 10) < 0.6
    frames, total = vid.read_frames(path, range(10))
    assert frames.shape == (10, 48, 80, 3) and frames.dtype == np.uint8 and total in (None, 10)
    assert vid.count_frames(path) == 10
    tolerance = 25 if ext == "gif" else 10  # gif is palettised
    assert np.abs(frames.astype(int) - video).mean() < tolerance
    # the right frames come back in order: each decoded frame is closest to its own source frame
    errors = np.abs(frames[:, None].astype(int) - video[None]).mean(axis=(2, 3, 4))
    assert (errors.argmin(axis=1) == np.arange(10)).all()


def test_image_folder_is_read_in_natural_order_exactly(tmp_path, clip):
    video, _ = clip
    for i, frame in enumerate(video):
        Image.fromarray(frame).save(tmp_path / f"f{i}.png")  # f10 after f9 needs natural sorting
    frames, total = vid.read_frames(tmp_path, [1, 9, 3])
    assert total == 10
    np.testing.assert_array_equal(frames, video[[1, 3, 9]])


def test_select_indices_stride_fps_and_uniform():
    sel = vid.select_indices(4, 24.0, total=100, start=5, stride=3)
    assert sel.indices == [5, 8, 11, 14] and sel.fps_out == 8.0
    sel = vid.select_indices(4, 24.0, total=100, fps=8.0)
    assert sel.indices == [0, 3, 6, 9] and sel.fps_out == 8.0 and sel.stride is None
    sel = vid.select_indices(3, 25.0, total=100, fps=10.0)  # non-integer step rounds to nearest frame
    assert sel.indices == [0, 3, 5]
    sel = vid.select_indices(16, 24.0, total=50, sample="uniform")  # reference: stride floor(50/16) = 3
    assert sel.stride == 3 and sel.indices == list(range(0, 48, 3)) and sel.fps_out == 8.0
    assert vid.select_indices(16, 8.0, total=16, sample="uniform").indices == list(range(16))


@pytest.mark.parametrize("kwargs,error", [
    (dict(frames=20, total=10), InputError),
    (dict(frames=8, total=10, stride=2), InputError),
    (dict(frames=16, total=10, sample="uniform"), InputError),
    (dict(frames=4, total=10, stride=2, fps=4.0), UsageError),
    (dict(frames=4, total=10, fps=30.0), UsageError),
])
def test_select_indices_refuses_impossible_selections(kwargs, error):
    with pytest.raises(error):
        vid.select_indices(source_fps=24.0, **kwargs)


def test_parse_size_square_and_width_by_height():
    assert vid.parse_size("512") == (512, 512)
    assert vid.parse_size("512x320") == (320, 512)
    for bad in ("500", "512x300", "abc", "0"):
        with pytest.raises(UsageError):
            vid.parse_size(bad)


def _columns(h: int, w: int) -> np.ndarray:
    """A frame whose red channel is the column index (so crops can be located)."""
    frame = np.zeros((1, h, w, 3), np.uint8)
    frame[..., 0] = np.arange(w)[None, None, :]
    frame[..., 1] = 200
    return frame


def test_resize_crop_pad_stretch_shapes_and_placement():
    src = _columns(100, 200)
    crop = vid.resize_frames(src, (64, 64), "crop")
    assert crop.shape == (1, 64, 64, 3)
    # scaled to 64x128, centre 64 columns kept: source columns ~[50, 150)
    assert 45 <= crop[0, 0, 0, 0] <= 55 and 145 <= crop[0, 0, -1, 0] <= 155
    pad = vid.resize_frames(src, (64, 64), "pad")
    assert pad.shape == (1, 64, 64, 3)
    assert (pad[0, :16] == 0).all() and (pad[0, 48:] == 0).all() and (pad[0, 16:48, :, 1] == 200).all()
    stretch = vid.resize_frames(src, (64, 128), "stretch")
    assert stretch.shape == (1, 64, 128, 3) and stretch[0, 0, 0, 0] < 3 and stretch[0, 0, -1, 0] > 196
    same = _columns(64, 64)
    np.testing.assert_array_equal(vid.resize_frames(same, (64, 64), "crop"), same)  # identity is exact


def test_nearest_mask_resize_stays_binary_and_lines_up_with_frames():
    video, masks = moving_disc(2, 96, 160)
    for mode in ("crop", "pad", "stretch"):
        small = vid.resize_frames(masks, (64, 64), mode, nearest=True)
        assert set(np.unique(small)) <= {0, 1}
        soft = vid.resize_frames(masks * 255, (64, 64), mode) > 127  # same geometry, smooth resampling
        iou = (soft & (small > 0)).sum() / (soft | (small > 0)).sum()
        assert iou > 0.9, mode


def test_load_clip_records_the_source(tmp_path, clip):
    video, _ = clip
    path = vid.write_mp4(tmp_path / "c.mp4", video, 12)
    loaded = vid.load_clip(path, frames=4, size="64", start=1, stride=2)
    src = loaded.source
    assert loaded.frames.shape == (4, 64, 64, 3)
    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert src["indices"] == [1, 3, 5, 7] and src["fps"] == 12.0 and src["fps_out"] == 6.0
    assert src["size"] == [64, 64] and src["source_size"] == [48, 80] and src["resize"] == "crop"
    uniform = vid.load_clip(path, frames=3, size="64", sample="uniform").source
    assert uniform["stride"] == 3 and uniform["indices"] == [0, 3, 6] and uniform["source_frames"] == 10


def test_bad_sources_raise_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        vid.probe(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 10)
    with pytest.raises(InputError, match="not a readable video"):
        vid.probe(text)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        vid.probe(tmp_path / "empty")


def test_write_mp4_round_trips_frames_and_fps_atomically(tmp_path, clip):
    video, _ = clip
    out = vid.write_mp4(tmp_path / "out" / "v.mp4", video[:, :47, :79], 8)  # odd sizes are padded
    frames, _ = vid.read_frames(out, range(10))
    assert frames.shape == (10, 48, 80, 3) and vid.probe(out).fps == 8.0
    assert np.abs(frames[:, :47, :79].astype(int) - video[:, :47, :79]).mean() < 10
    assert sorted(p.name for p in out.parent.iterdir()) == ["v.mp4"]  # no temp file left


def test_write_gif_round_trips(tmp_path, clip):
    video, _ = clip
    out = vid.write_gif(tmp_path / "p.gif", video, 10)
    with Image.open(out) as img:
        assert img.n_frames == 10 and img.info["duration"] == 100
        img.seek(4)
        assert np.abs(np.asarray(img.convert("RGB")).astype(int) - video[4]).mean() < 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gif"]


def test_side_by_side_and_overlay(clip):
    video, masks = clip
    half = video[:, ::2, ::2]
    both = vid.side_by_side(video, half, labels=["src", "half"], gap=4)
    assert both.shape == (10, 48, 80 + 4 + 80, 3)
    tinted = vid.overlay_mask(video, masks, (255, 0, 0), 0.5)
    inside, outside = masks.astype(bool), ~masks.astype(bool)
    np.testing.assert_array_equal(tinted[outside], video[outside])
    assert (tinted[inside][:, 0].astype(int) >= video[inside][:, 0]).all()
    assert (tinted[inside] != video[inside]).any()
    with pytest.raises(ValueError):
        vid.side_by_side(video, video[:3])
