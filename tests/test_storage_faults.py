"""Faults a remote workspace must survive without losing good remote work (issue 25): a scratch copy a temp
cleaner thinned out, writers whose wall clocks are skewed, a lease left by a dead process on another node,
and clips given as URLs whose content changes under the same size and mtime. Every fault is caused for
real (files deleted, a process killed, an object replaced), against file:// and a local S3 endpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_storage import MASK, INVERT, Endpoint, contents, pointer, s3, url, write  # noqa: F401 (fixtures)

from stages.common.errors import InputError
from stages.io import storage_lease
from stages.io.storage import LeaseHeld, Storage

TTL = 3.0  # a short lease for the tests that wait for one to lapse (S3 times have 1 s resolution)


class SkewedTime:
    """The `time` module as a machine whose wall clock is off by `seconds` sees it."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __getattr__(self, name):
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.seconds


@contextlib.contextmanager
def skewed(seconds: float):
    """Within the block, this process's lease code reads a wall clock off by `seconds`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage_lease, "time", SkewedTime(seconds))
        yield


def retrying(fn, seconds: float):
    """fn() until it stops raising LeaseHeld (bounded); returns its value."""
    end = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except LeaseHeld:
            assert time.monotonic() < end, "the lease was never taken over"
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- scratch copies
def test_scratch_copy_missing_chunks_is_pulled_again(url, tmp_path):
    with Storage(url, tmp_path / "node1") as node:
        write(node.local, {**MASK, **INVERT})
        node.push("invert")
        local = node.local
    # the node is killed, then a temp cleaner deletes some chunks of its scratch copy
    (local / "video/frames/c/0").unlink()
    (local / "inversion/latents/c/2").unlink()
    with Storage(url, tmp_path / "node1") as retry:
        assert retry.pull()
        assert contents(retry.local) == {**MASK, **INVERT}  # pulled again, not trusted by its generation


def test_push_never_publishes_deletions_the_stage_did_not_make(url, tmp_path):
    with Storage(url, tmp_path / "node1") as node:
        write(node.local, MASK)
        node.push("mask")
        before = pointer(node)
        (node.local / "video/frames/c/0").unlink()  # a cleaner strikes while the inversion runs
        write(node.local, INVERT)
        with pytest.raises(Exception) as err:
            node.push("invert")
        assert not isinstance(err.value, InputError) and "video/frames/c/0" in str(err.value)
        after = pointer(node)
        assert after["generation"] == before["generation"] and "video/frames/c/0" in after["files"]
    with Storage(url, tmp_path / "node1") as retry:  # the retry pulls the good copy again and redoes the stage
        assert retry.pull() and contents(retry.local) == MASK
        write(retry.local, INVERT)
        assert retry.push("invert") == len(INVERT)
    with Storage(url, tmp_path / "reader") as reader:
        assert reader.pull(lease=False) and contents(reader.local) == {**MASK, **INVERT}


def test_a_stage_publishes_its_own_deletions_only_when_it_ran(url, tmp_path):
    with Storage(url, tmp_path / "node1") as node:
        write(node.local, {**MASK, **INVERT})
        node.push("invert")
        (node.local / "inversion/latents/c/3").unlink()  # the inversion dropped a chunk (zarr: all fill value)
        with pytest.raises(Exception, match="inversion/latents/c/3"):
            node.push("invert", ran=False)  # a stage that was skipped deleted nothing
    with Storage(url, tmp_path / "node1") as node:
        assert node.pull() and (node.local / "inversion/latents/c/3").is_file()
        (node.local / "inversion/latents/c/3").unlink()
        node.push("invert")  # a stage that ran may delete what it wrote
        assert "inversion/latents/c/3" not in pointer(node)["files"]
        assert "video/frames/c/0" in pointer(node)["files"]


# ---------------------------------------------------------------------------------------------- leases
@pytest.mark.parametrize("who", ["taker ahead", "holder behind"])
def test_skewed_wall_clocks_never_take_a_live_lease(url, tmp_path, who):
    holder = Storage(url, tmp_path / "node1")
    with skewed(-3600 if who == "holder behind" else 0):  # the holder's clock is an hour behind
        holder.pull()
    with skewed(3600 if who == "taker ahead" else 0), pytest.raises(LeaseHeld):  # or the taker's ahead
        Storage(url, tmp_path / "node2").pull()
    holder.release()


HOLDER = """\
import os, signal, sys
from stages.io import storage_lease
storage_lease.HOST = "node-b"  # another node: its pid means nothing here
from stages.io.storage import Storage
node = Storage(sys.argv[1], sys.argv[2], lease_s=float(sys.argv[3]))
node.pull()
for rel in sys.argv[4:]:  # what it had pushed before it died
    os.makedirs(os.path.dirname(os.path.join(node.local, rel)), exist_ok=True)
    open(os.path.join(node.local, rel), "w").write(rel)
if sys.argv[4:]:
    node.push("mask")
os.kill(os.getpid(), signal.SIGKILL)  # the node dies holding the lease
"""


def dead_holder(url: str, scratch: Path, *pushed: str, ttl: float = TTL) -> None:
    """Leave the lease of `url` to a process on "another node" that was killed while holding it (after it
    pushed the files `pushed`)."""
    done = subprocess.run([sys.executable, "-c", HOLDER, url, str(scratch), str(ttl), *pushed],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr


def test_lease_of_a_dead_holder_is_taken_over_on_the_storage_clock(url, tmp_path):
    dead_holder(url, tmp_path / "node-b", "zarr.json", "video/frames/c/0")
    taker = Storage(url, tmp_path / "node-a")
    with skewed(-3600):  # the taker's clock is an hour behind: only the storage's clock can tell
        with pytest.raises(LeaseHeld):
            taker.pull()  # not at once: the holder has a whole TTL to renew
        assert retrying(taker.pull, 10 * TTL)
    assert contents(taker.local) == {"zarr.json": "zarr.json", "video/frames/c/0": "video/frames/c/0"}
    taker.release()


def test_lease_held_is_transient_and_a_writer_may_wait_for_a_dead_holder(url, tmp_path):
    from stages.common.errors import Transient

    assert issubclass(LeaseHeld, Transient) and not issubclass(LeaseHeld, InputError)
    dead_holder(url, tmp_path / "node-b", "zarr.json")
    with Storage(url, tmp_path / "node-a", wait_dead=True) as taker:
        assert taker.pull()  # waits (at most about one TTL) instead of failing
    live = Storage(url, tmp_path / "node-c", lease_s=1.0)
    live.pull()
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match="being written by"):
        Storage(url, tmp_path / "node-d", wait_dead=True).pull()  # its heartbeats go on: refused
    assert time.monotonic() - started < 30
    live.release()


# ---------------------------------------------------------------------------------------------- the batch
ONE = """\
defaults: {{model: tiny, frames: 4, size: 64, box: [16, 16, 48, 48], box_only: true, prompt: "a red disc"}}
clips:
  - clip: {clip}
"""


def test_batch_resumes_a_clip_whose_lease_a_dead_node_left(tmp_path):
    from typer.testing import CliRunner

    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4
    from vdcli.app import app

    write_mp4(tmp_path / "a.mp4", moving_disc(4, 64, 64, seed=0)[0], fps=8.0)
    (tmp_path / "m.yaml").write_text(ONE.format(clip=tmp_path / "a.mp4"))
    out = f"file://{tmp_path / 'runs'}"
    dead_holder(f"{out}/a.vd", tmp_path / "node-b")
    r = CliRunner().invoke(app, ["batch", str(tmp_path / "m.yaml"), "--out", out, "--only", "mask",
                                 "--scratch", str(tmp_path / "node-a"), "-q", "--json"])
    assert r.exit_code == 0, r.output
    clip = json.loads(r.stdout)["clips"][0]
    assert clip["status"] == "done" and clip["run"] == ["mask"]


# ---------------------------------------------------------------------------------------------- URL clips
def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_file_url_clip_replaced_with_same_size_and_mtime_is_fetched_again(tmp_path):
    from stages.io.storage import fetch_clip

    src = tmp_path / "clips" / "a.mp4"
    src.parent.mkdir()
    src.write_bytes(b"A" * 4096)
    first = fetch_clip(f"file://{src}", tmp_path / "scratch")
    assert Path(first).read_bytes() == b"A" * 4096
    stat = src.stat()
    src.write_bytes(b"B" * 4096)  # other content, same size, the old mtime restored
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = fetch_clip(f"file://{src}", tmp_path / "scratch")
    assert Path(again).read_bytes() == b"B" * 4096

    from stages.io.storage import fetch_clip_info

    info = fetch_clip_info(f"file://{src}", tmp_path / "scratch")
    assert info.path == again and info.sha256 == sha(src) and info.remote["size"] == 4096


def test_s3_clip_replaced_with_same_size_is_fetched_again(s3, tmp_path):
    from stages.io.storage import fetch_clip

    s3.fs.pipe_file("vd-store/clips/a.mp4", b"A" * 4096)
    first = fetch_clip("s3://vd-store/clips/a.mp4", tmp_path / "scratch")
    assert Path(first).read_bytes() == b"A" * 4096
    s3.fs.pipe_file("vd-store/clips/a.mp4", b"B" * 4096)
    again = fetch_clip("s3://vd-store/clips/a.mp4", tmp_path / "scratch")
    assert Path(again).read_bytes() == b"B" * 4096

    from stages.io.storage import fetch_clip_info

    info = fetch_clip_info("s3://vd-store/clips/a.mp4", tmp_path / "scratch")
    assert info.sha256 == hashlib.sha256(b"B" * 4096).hexdigest()
    assert info.remote["etag"].strip('"') == hashlib.md5(b"B" * 4096).hexdigest()  # S3's ETag of a single PUT


def test_damaged_cached_clip_is_fetched_again(url, tmp_path, request):
    from stages.io.storage import fetch_clip

    if url.startswith("s3://"):
        clip = "s3://vd-store/clips/a.mp4"
        request.getfixturevalue("s3").fs.pipe_file("vd-store/clips/a.mp4", b"A" * 4096)
    else:
        (tmp_path / "a.mp4").write_bytes(b"A" * 4096)
        clip = f"file://{tmp_path / 'a.mp4'}"
    cached = Path(fetch_clip(clip, tmp_path / "scratch"))
    stat = cached.stat()
    with open(cached, "r+b") as fh:  # bit rot in the cache: same size, same mtime
        fh.seek(100)
        fh.write(b"X")
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert Path(fetch_clip(clip, tmp_path / "scratch")).read_bytes() == b"A" * 4096
