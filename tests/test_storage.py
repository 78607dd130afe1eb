"""Remote workspaces (stages.io.storage): generations made visible by one pointer written last, the write
lease, atomic small objects, and injected faults: an S3 endpoint (local moto server) stopped mid-push and
restarted, two writers on one prefix, a stale writer, torn pointers and leases, a reader racing a push."""

from __future__ import annotations

import gc
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from stages.common.errors import InputError, Transient
from stages.io import storage as S
from stages.io.storage import LEASE, MARKER, PREVIOUS, LeaseHeld, Storage

MASK = {"zarr.json": "root", "video/zarr.json": "v", "video/frames/c/0": "frames-0", "masks/edit/zarr.json": "m",
        "masks/edit/c/0": "mask-0"}
INVERT = {"inversion/zarr.json": "i", **{f"inversion/latents/c/{k}": f"latent-{k}" * 20 for k in range(4)}}


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def contents(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def wait_for(condition, seconds: float = 10.0) -> None:
    """Bounded poll (no fixed sleep): fails the test if `condition` stays false."""
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


class Endpoint:
    """A local S3 endpoint that can be stopped and restarted on the same port (objects survive)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.up = True
        # moto keeps objects per process, across servers: start each test from an empty store
        urllib.request.urlopen(urllib.request.Request(f"http://{self.host}:{self.port}/moto-api/reset",
                                                      method="POST"), timeout=10).read()

    def stop(self) -> None:
        if self.up:
            self.server.stop()
            self.up = False

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.up = True


@pytest.fixture
def s3(monkeypatch):
    import fsspec

    end = Endpoint()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{end.host}:{end.port}"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    # a stopped endpoint fails fast (one attempt) instead of botocore's retries with back-off
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {
        "retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}})
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("vd-store")
    end.fs = fs
    yield end
    end.stop()


@pytest.fixture(params=["file", "s3"])
def url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path / 'remote' / 'a.vd'}"
    request.getfixturevalue("s3")
    return "s3://vd-store/runs/a.vd"


def pointer(store: Storage) -> dict:
    return json.loads(store.fs.cat_file(f"{store.root}/{MARKER}"))


def remote_files(store: Storage) -> set[str]:
    store.fs.invalidate_cache()
    return {p[len(store.root) + 1:] for p in store.fs.find(store.root)}


# ---------------------------------------------------------------------------------------------- layout
def test_generations_pointer_last_and_old_files_collected(tmp_path):
    url = f"file://{tmp_path / 'remote' / 'a.vd'}"
    node = Storage(url, tmp_path / "node1")
    assert not node.pull()
    write(node.local, MASK)
    assert node.push("mask") == len(MASK) and node.push("mask") == 0  # nothing changed: nothing uploaded
    first = pointer(node)
    assert first["version"] == 2 and first["stage"] == "mask" and set(first["files"]) == set(MASK)
    write(node.local, INVERT)
    assert node.push("invert") == len(INVERT)
    second = pointer(node)
    assert json.loads((tmp_path / "remote" / "a.vd" / PREVIOUS).read_text())["generation"] == first["generation"]
    # unchanged files stay in the generation that uploaded them; new ones live in the new generation
    assert {gen for _, gen in second["files"].values()} == {first["generation"], second["generation"]}
    assert second["files"]["zarr.json"][1] == first["generation"]
    write(node.local, {"inversion/latents/c/0": "redone"})
    assert node.push("invert") == 1
    write(node.local, {"inversion/latents/c/0": "redone twice"})
    assert node.push("invert") == 1
    # files named by neither the current nor the previous pointer are gone
    on_remote = remote_files(node)
    previous = json.loads((tmp_path / "remote" / "a.vd" / PREVIOUS).read_text())
    named = {f"gens/{gen}/{rel}" for p in (pointer(node), previous) for rel, (_, gen) in p["files"].items()}
    assert {f for f in on_remote if f.startswith("gens/")} == named
    assert not [f for f in on_remote if f.endswith(".tmp")]
    # another node reads exactly the local copy back
    node.release()
    other = Storage(url, tmp_path / "node2")
    assert other.pull(lease=False)
    assert contents(other.local) == contents(node.local)


def test_transfers_are_batched(s3, tmp_path):
    url = "s3://vd-store/runs/b.vd"
    node = Storage(url, tmp_path / "node1")
    calls = {"put": [], "get": []}
    for name in calls:
        real = getattr(node.fs, name)
        setattr(node.fs, name, lambda lpaths, rpaths, _real=real, _name=name, **kw:
                (calls[_name].append(len(lpaths)), _real(lpaths, rpaths, **kw))[1])
    write(node.local, {**MASK, **INVERT})
    assert node.push("invert") == len(MASK) + len(INVERT)
    assert calls["put"] == [len(MASK) + len(INVERT)]  # one batched call, not one per file
    node.local.rename(node.local.with_name("moved"))  # force a download
    assert node.pull()
    assert calls["get"] == [len(MASK) + len(INVERT)] and contents(node.local) == {**MASK, **INVERT}


# ---------------------------------------------------------------------------------------------- faults
def test_endpoint_stopped_mid_push_then_restarted_retry_only_pushes(s3, tmp_path):
    url = "s3://vd-store/runs/a.vd"
    scratch = tmp_path / "node1"
    writer = Storage(url, scratch)
    writer.pull()
    write(writer.local, MASK)
    writer.push("mask")
    write(writer.local, INVERT)  # the inversion finished locally
    real, done = writer.fs._put_file, []

    async def dying(lpath, rpath, **kw):  # the endpoint goes away after the first file of the upload
        if done:
            s3.stop()
        done.append(rpath)
        return await real(lpath, rpath, **kw)

    writer.fs._put_file = dying
    with pytest.raises(Exception):
        writer.push("invert")
    assert done and not s3.up
    del writer  # the failed clip's writer is dropped (its lease cannot be returned: endpoint down)
    gc.collect()
    s3.start()
    # a reader meanwhile sees the last complete stage only
    reader = Storage(url, tmp_path / "reader")
    assert reader.pull(lease=False) and contents(reader.local) == MASK
    # the retry (same node) keeps its local copy, takes over the lease left behind, and only pushes
    retry = Storage(url, scratch)
    assert retry.pull()
    assert contents(retry.local) == {**MASK, **INVERT}  # nothing recomputed, nothing re-downloaded
    assert retry.push("invert") == len(INVERT)  # the mask stage is not uploaded again
    again = Storage(url, tmp_path / "reader2")
    assert again.pull(lease=False) and contents(again.local) == {**MASK, **INVERT}
    # the half-uploaded generation was collected
    gens = {f.split("/")[1] for f in remote_files(retry) if f.startswith("gens/")}
    assert gens == {gen for _, gen in pointer(retry)["files"].values()}


def test_push_whose_pointer_landed_is_not_pushed_again(tmp_path, monkeypatch):
    url = f"file://{tmp_path / 'remote' / 'a.vd'}"
    writer = Storage(url, tmp_path / "node1")
    write(writer.local, MASK)
    real = Storage._save_state

    def crash_after_pointer(self, state):
        if "pending" not in state and state.get("generation"):
            raise OSError("node lost right after the pointer moved")
        real(self, state)

    monkeypatch.setattr(Storage, "_save_state", crash_after_pointer)
    with pytest.raises(OSError):
        writer.push("mask")
    monkeypatch.setattr(Storage, "_save_state", real)
    assert writer.pull()  # the pending generation is the remote's: adopted, not downloaded again
    assert writer.push("mask") == 0


def test_second_writer_refused_stale_writer_loses(url, tmp_path):
    first = Storage(url, tmp_path / "node1", lease_s=2.0)
    first.pull()
    write(first.local, MASK)
    first.push("mask")
    second = Storage(url, tmp_path / "node2")
    with pytest.raises(LeaseHeld) as err:
        second.pull()
    message = str(err.value)
    assert isinstance(err.value, Transient) and "\n" not in message and "being written by" in message
    with pytest.raises(LeaseHeld):
        second.push("mask")
    # the first writer stalls (no heartbeats): once its TTL passes on the store's clock, the second takes over
    first.lease._stop.set()
    second.wait_dead = True
    assert second.pull()
    assert contents(second.local) == MASK
    # the stale writer wakes up and pushes: refused, the pointer does not move
    before = pointer(second)["generation"]
    write(first.local, INVERT)
    with pytest.raises(LeaseHeld, match="lost the write lease"):
        first.push("invert")
    assert pointer(second)["generation"] == before
    write(second.local, INVERT)
    assert second.push("invert") == len(INVERT)
    second.release()
    third = Storage(url, tmp_path / "node3")
    assert third.pull() and contents(third.local) == {**MASK, **INVERT}


def test_lease_is_renewed_while_the_writer_lives(s3, tmp_path):
    url = "s3://vd-store/runs/a.vd"
    writer = Storage(url, tmp_path / "node1", lease_s=3.0)
    writer.pull()
    path = writer.lease.path
    beat = json.loads(writer.fs.cat_file(path))["beat"]
    wait_for(lambda: json.loads(writer.fs.cat_file(path))["beat"] > beat)  # renewed in the background
    with pytest.raises(LeaseHeld):
        Storage(url, tmp_path / "node2").pull()
    writer.release()
    assert not writer.fs.exists(path)
    assert Storage(url, tmp_path / "node2").pull() is False  # free again; nothing pushed yet


def test_dropped_writer_returns_its_lease(tmp_path):
    url = f"file://{tmp_path / 'remote' / 'a.vd'}"
    writer = Storage(url, tmp_path / "node1")
    writer.pull()
    lease = Path(writer.lease.path)
    assert lease.is_file()
    del writer  # a failed clip: the batch drops its Storage without cleanup()
    gc.collect()
    assert not lease.exists()


# ---------------------------------------------------------------------------------------------- torn objects
def test_torn_pointer_recovers_from_previous_or_says_what_to_do(tmp_path):
    url = f"file://{tmp_path / 'remote' / 'a.vd'}"
    remote = tmp_path / "remote" / "a.vd"
    with Storage(url, tmp_path / "node1") as node:
        write(node.local, MASK)
        node.push("mask")
        write(node.local, INVERT)
        node.push("invert")
    text = (remote / MARKER).read_text()
    (remote / MARKER).write_text(text[: len(text) // 2])  # torn
    reader = Storage(url, tmp_path / "reader")
    assert reader.pull() and contents(reader.local) == MASK  # the previous generation, complete
    write(reader.local, INVERT)
    assert reader.push("invert") == len(INVERT)  # and the next push repairs the pointer
    assert json.loads((remote / MARKER).read_text())["stage"] == "invert"
    reader.release()
    (remote / MARKER).write_text('{"version": 2, "files": ')
    (remote / PREVIOUS).unlink()
    with pytest.raises(InputError) as err:
        Storage(url, tmp_path / "node3").pull()
    assert "unreadable" in str(err.value) and "\n" not in str(err.value)


def test_torn_lease_and_torn_local_state_are_recovered(tmp_path):
    url = f"file://{tmp_path / 'remote' / 'a.vd'}"
    remote = tmp_path / "remote" / "a.vd"
    with Storage(url, tmp_path / "node1") as node:
        write(node.local, MASK)
        node.push("mask")
    (remote / LEASE).write_text('{"owner": "x", "exp')  # a torn lease is nobody's lease
    node = Storage(url, tmp_path / "node1")
    node.state_file.write_text('{"generation": ')  # a torn local sync state: download again
    assert node.pull() and contents(node.local) == MASK
    assert json.loads((remote / LEASE).read_text())["token"] == node.lease.token


def test_pointer_writes_on_file_urls_are_atomic(tmp_path):
    url = f"file://{tmp_path / 'remote' / 'a.vd'}"
    writer = Storage(url, tmp_path / "node1")
    write(writer.local, MASK)
    writer.push("mask")
    marker, stop, bad = tmp_path / "remote" / "a.vd" / MARKER, threading.Event(), []

    def read_all_the_time() -> None:
        while not stop.is_set():
            try:
                json.loads(marker.read_text())
            except ValueError as exc:  # an in-place rewrite is seen empty or half-written
                bad.append(exc)

    thread = threading.Thread(target=read_all_the_time)
    thread.start()
    try:
        for k in range(10):
            write(writer.local, {"masks/edit/c/0": f"edit {k}" * (k + 1)})
            assert writer.push("mask") == 1
    finally:
        stop.set()
        thread.join(10)
    assert not bad


# ---------------------------------------------------------------------------------------------- readers
def test_reader_never_sees_a_half_pushed_generation(url, tmp_path, monkeypatch):
    writer = Storage(url, tmp_path / "node1")
    write(writer.local, MASK)
    writer.push("mask")
    seen = {}
    real = Storage._upload

    def upload_then_read(self, gen, rels):
        real(self, gen, rels)  # every file of the new generation is up; the pointer has not moved yet
        reader = Storage(url, tmp_path / "reader")
        seen["before_pointer"] = reader.pull(lease=False) and contents(reader.local)
        seen["old_pointer"] = reader._pointer()

    monkeypatch.setattr(Storage, "_upload", upload_then_read)
    write(writer.local, {**INVERT, "masks/edit/c/0": "mask redone"})
    writer.push("invert")
    assert seen["before_pointer"] == MASK
    # a reader that resolved the old pointer can still fetch it after the pointer moved
    late = tmp_path / "late"
    Storage(url, tmp_path / "reader3")._download(seen["old_pointer"], late)
    assert contents(late) == MASK
    monkeypatch.setattr(Storage, "_upload", real)
    out = S.copy_out(url, tmp_path / "copy")
    assert contents(out) == {**MASK, **INVERT, "masks/edit/c/0": "mask redone"}


def test_version_1_workspaces_are_read_and_carried_over(tmp_path):
    remote = tmp_path / "remote" / "a.vd"
    write(remote, {**MASK, **INVERT})
    # the old marker after an interrupted upload of the inversion: that stage is not trusted
    (remote / MARKER).write_text(json.dumps({"state": "writing", "stage": "invert", "generation": None,
                                             "files": {rel: 1 for rel in {**MASK, **INVERT}}}))
    url = f"file://{remote}"
    node = Storage(url, tmp_path / "node1")
    assert node.pull() and contents(node.local) == MASK
    write(node.local, INVERT)
    assert node.push("invert") == len(INVERT)
    files = pointer(node)["files"]
    assert files["zarr.json"][1] == "" and files["inversion/zarr.json"][1] != ""  # old files stay where they are
    node.release()
    other = Storage(url, tmp_path / "node2")
    assert other.pull() and contents(other.local) == {**MASK, **INVERT}


# ---------------------------------------------------------------------------------------------- the batch
BATCH = """\
defaults: {model: tiny, frames: 4, size: 64, invert: {steps: 2, null_steps: 1}, box: [16, 16, 48, 48],
           box_only: true, prompt: "a red disc on a grey textured background", subject: "red disc"}
clips:
  - clip: clips/a.mp4
"""


def test_batch_after_an_outage_mid_push_does_not_recompute(s3, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4
    from vdcli.app import app

    (tmp_path / "clips").mkdir()
    write_mp4(tmp_path / "clips" / "a.mp4", moving_disc(4, 64, 64, seed=0)[0], fps=8.0)
    (tmp_path / "m.yaml").write_text(BATCH)
    args = ["batch", str(tmp_path / "m.yaml"), "--out", "s3://vd-store/runs", "--scratch", str(tmp_path / "node"),
            "--only", "mask", "--threads-per-worker", "1", "-q", "--json"]
    real, armed = Storage._upload, [True]

    def outage(self, gen, rels):  # the endpoint dies while the finished stage is being uploaded
        if armed:
            armed.clear()
            real(self, gen, rels[:1])
            s3.stop()
        real(self, gen, rels)

    monkeypatch.setattr(Storage, "_upload", outage)
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output
    failed = json.loads(first.stdout)["clips"][0]
    assert failed["status"] == "failed" and failed["stage"] == "mask" and "Could not connect" in failed["error"]
    s3.start()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    clip = json.loads(again.stdout)["clips"][0]
    assert clip["run"] == [] and clip["skipped"] == ["mask"]  # the finished stage is only pushed
    files = json.loads(s3.fs.cat_file(f"vd-store/runs/a.vd/{MARKER}"))["files"]
    assert "masks/raw/zarr.json" in files and "video/frames/zarr.json" in files
