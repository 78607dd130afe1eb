"""Clip identity from content (stages.io.video.source_sha256, stages.common.digest.file_sha256): a video file
or an image folder whose bytes changed is a new clip even when sizes, names and mtimes are kept, and the digest
cache (keyed by dev, inode, size, mtime and ctime) is used while a file is unchanged and never after."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from file_faults import cache, cache_everything, replace_keeping_stat  # noqa: F401 (fixtures)
from stages.common import digest as dg
from stages.common.errors import InputError
from stages.io import video as vid
from stages.io.synthetic import moving_disc


def _write_frames(folder: Path, frames: np.ndarray, ext: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        paths.append(folder / f"f{i}.{ext}")
        Image.fromarray(frame).save(paths[-1])  # BMP and default TIFF: uncompressed, size set by the shape
    return paths


def test_file_sha256_is_the_streamed_sha256_and_follows_links(tmp_path):
    path = tmp_path / "clip.bin"
    path.write_bytes(os.urandom(3 << 20) + b"tail")
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert dg.file_sha256(path) == want == dg.file_sha256(link) == vid.source_sha256(path)
    with pytest.raises(InputError) as err:
        vid.source_sha256(tmp_path / "absent.mp4")
    assert "absent.mp4" in str(err.value) and "\n" not in str(err.value)


def test_cache_is_used_while_unchanged_and_keyed_by_ctime(tmp_path, cache, cache_everything):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"a" * 5000)
    assert vid.source_sha256(path) == hashlib.sha256(b"a" * 5000).hexdigest()
    (entry,) = cache.iterdir()
    st = path.stat()
    assert entry.name == f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}"
    entry.write_text("f" * 64)  # proves the next answer comes from the cache
    assert vid.source_sha256(path) == "f" * 64
    replace_keeping_stat(path, b"b" * 5000)
    assert vid.source_sha256(path) == hashlib.sha256(b"b" * 5000).hexdigest()


def test_recently_changed_or_small_files_are_not_cached(tmp_path, cache, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"a" * 5000)
    monkeypatch.setattr(dg, "CACHE_MIN_BYTES", 0)
    vid.source_sha256(path)  # just written: within the racy window
    assert not cache.exists() or not any(cache.iterdir())
    monkeypatch.setattr(dg, "RACY_NS", 0)
    monkeypatch.setattr(dg, "CACHE_MIN_BYTES", 10_000)
    vid.source_sha256(path)
    assert not cache.exists() or not any(cache.iterdir())


def test_video_replaced_with_same_size_and_mtime_is_a_new_clip(tmp_path):
    video, _ = moving_disc(6, 32, 48, seed=1)
    path = vid.write_mp4(tmp_path / "c.mp4", video, 8)
    before = vid.load_clip(path, frames=2, size="64").source["sha256"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    replace_keeping_stat(path, bytes(data))
    after = vid.load_clip(path, frames=2, size="64").source["sha256"]
    assert after != before and after == hashlib.sha256(bytes(data)).hexdigest()


@pytest.mark.parametrize("ext", ["bmp", "tiff"])
def test_image_folder_frame_replaced_by_one_of_the_same_size(tmp_path, ext):
    video, _ = moving_disc(4, 32, 48, seed=2)
    paths = _write_frames(tmp_path / "frames", video, ext)
    before = vid.source_sha256(tmp_path / "frames")
    st = paths[2].stat()
    other = tmp_path / f"other.{ext}"
    Image.fromarray(255 - video[2]).save(other)
    assert other.stat().st_size == st.st_size  # the same byte size: only the content tells them apart
    replace_keeping_stat(paths[2], other.read_bytes())
    assert vid.source_sha256(tmp_path / "frames") != before


def test_image_folder_identity_is_names_and_content_not_location(tmp_path):
    video, _ = moving_disc(3, 32, 32, seed=4)
    _write_frames(tmp_path / "a", video, "png")
    _write_frames(tmp_path / "b", video, "png")
    ident = vid.source_sha256(tmp_path / "a")
    assert vid.source_sha256(tmp_path / "b") == ident  # a copy elsewhere is the same clip
    (tmp_path / "b" / "notes.txt").write_text("not a frame")
    assert vid.source_sha256(tmp_path / "b") == ident
    (tmp_path / "b" / "f2.png").rename(tmp_path / "b" / "f3.png")  # a renamed frame is another clip
    assert vid.source_sha256(tmp_path / "b") != ident
    (tmp_path / "a" / "f0.png").write_bytes((tmp_path / "a" / "f1.png").read_bytes())  # swapped content
    assert vid.source_sha256(tmp_path / "a") != ident


def test_mask_sees_a_replaced_bmp_frame_as_a_changed_clip(tmp_path):
    from stages.mask import is_current
    from stages.mask.run import MaskConfig, run_mask

    video, _ = moving_disc(4, 48, 48, seed=5)
    paths = _write_frames(tmp_path / "frames", video, "bmp")
    cfg = MaskConfig(frames=4, size="64", box="4,4,20,20", box_only=True, ellipse=False)
    run_mask(tmp_path / "frames", tmp_path / "ws", cfg)
    assert is_current(tmp_path / "ws", tmp_path / "frames", cfg) == (True, "")
    other = tmp_path / "other.bmp"
    Image.fromarray(np.roll(video[1], 7, axis=1)).save(other)
    replace_keeping_stat(paths[1], other.read_bytes())
    fresh, why = is_current(tmp_path / "ws", tmp_path / "frames", cfg)
    assert not fresh and "content changed" in why
