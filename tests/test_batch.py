"""`vd batch`: manifests, local and Ray engines (equal outputs, one model load per worker), a broken clip,
resume after a SIGKILL, workspaces on S3 (a local moto server), retries. Tiny model, 4 frames, 64 px."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vdcli.app import app

runner = CliRunner()
GOOD = {"a": ["blue-cube"], "b": ["blue-cube"], "c": ["green"]}
MANIFEST = """\
defaults:
  model: tiny
  frames: 4
  size: 64
  invert: {steps: 2, null_steps: 1}
  box: [16, 16, 48, 48]
  box_only: true
  prompt: "a red disc on a grey textured background"
  subject: "red disc"
  edits: ["blue cube"]
  eval: {metrics: [psnr, ssim]}
clips:
  - clip: clips/a.mp4
  - clip: clips/b.mp4
  - {clip: clips/c.mp4, edits: [{prompt: "green ball", name: green}]}
  - {clip: clips/missing.mp4, name: broken}
"""
# the issue's example, exactly as written there
EXAMPLE = """\
defaults:
  model: tiny
  frames: 8
  size: 128
  invert: {steps: 4, null_steps: 2}
clips:
  - clip: clips/a.mp4          # path relative to the manifest, or a URL
    name: a                     # optional workspace name (default: the clip's stem)
    box: [40, 40, 100, 100]
    box_only: true              # or points / mask_dir / mask_video
    prompt: "a red disc on a grey textured background"
    subject: "red disc"
    edits: ["blue cube", {prompt: "green ball", name: green}]
"""


def write_clips(folder: Path, frames: int = 4, size: int = 64) -> Path:
    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    (folder / "clips").mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate("abc"):
        video, _ = moving_disc(frames, size, size, seed=seed)
        write_mp4(folder / "clips" / f"{name}.mp4", video, fps=8.0)
    return folder


def batch(*args: object):
    return runner.invoke(app, ["batch", *map(str, args)])


def report(result) -> dict:
    return json.loads(result.stdout)


def arrays(ws: Path, edits: list[str]) -> dict[str, np.ndarray]:
    from stages.io.workspace import Workspace

    w = Workspace.open(ws)
    names = ["video/frames", "masks/edit", "inversion/latents", "inversion/null_embeddings",
             "inversion/recon_latents"] + [f"edits/{e}/frames" for e in edits]
    return {n: w.read(n) for n in names}


def assert_same_outputs(out_a: Path, out_b: Path) -> None:
    for clip, edits in GOOD.items():
        a, b = arrays(out_a / f"{clip}.vd", edits), arrays(out_b / f"{clip}.vd", edits)
        for name in a:
            assert np.array_equal(a[name], b[name]), f"{clip}: {name} differs"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = write_clips(tmp_path_factory.mktemp("batch"))
    (folder / "m.yaml").write_text(MANIFEST)
    return folder


@pytest.fixture(scope="module")
def clean(folder):
    """The 4-clip manifest (one clip missing) run once with the local engine, 2 workers, loads counted."""
    import stages.models.load

    real, loads = stages.models.load.load_models, []

    def counting(spec, **kw):
        loads.append(spec)
        return real(spec, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages.models.load, "load_models", counting)
        r = batch(folder / "m.yaml", "--out", folder / "local", "--workers", 2, "--threads-per-worker", 1,
                  "-q", "--json")
    return folder / "local", r, loads


def test_local_batch_broken_clip_and_one_load_per_worker(clean):
    out, r, loads = clean
    assert r.exit_code == 1, r.output
    rep = report(r)
    assert rep["counts"] == {"clips": 4, "done": 3, "failed": 1, "stages_run": 12, "stages_skipped": 0}
    assert [f["name"] for f in rep["failed"]] == ["broken"] and "missing.mp4 not found" in rep["failed"][0]["error"]
    assert "broken" in r.stderr and r.stderr.count("\n") == 1
    assert loads == ["tiny", "tiny"]  # one per worker, not one per stage per clip
    assert sorted(w["model_loads"] for w in rep["model_loads"]["per_worker"]) == [1, 1]
    clips = {c["name"]: c for c in rep["clips"]}
    assert clips["c"]["stages"]["edit"]["edits_run"] == ["green"]
    assert set(rep["compare"]["groups"]) == {"reconstruction", "all edits", "blue-cube", "green"}
    assert rep["compare"]["groups"]["blue-cube"]["n"] == 2
    assert (out / "a.vd" / "edits" / "blue-cube" / "edit.mp4").is_file() and not (out / "broken.vd").exists()


def test_ray_engine_gives_the_same_outputs(clean, folder):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        r = batch(folder / "m.yaml", "--engine", "ray", "--workers", 2, "--threads-per-worker", 1,
                  "--out", folder / "ray", "-q", "--json")
    finally:
        ray.shutdown()
    assert r.exit_code == 1, r.output
    rep = report(r)
    assert rep["counts"]["done"] == 3 and [f["name"] for f in rep["failed"]] == ["broken"]
    per_worker = rep["model_loads"]["per_worker"]
    assert len(per_worker) == 2 and all(w["model_loads"] == 1 for w in per_worker)
    assert len({w["pid"] for w in per_worker} | {os.getpid()}) == 3  # actors are other processes
    assert_same_outputs(clean[0], folder / "ray")


def test_killed_batch_resumes_and_equals_a_clean_run(clean, folder):
    out = folder / "killed"
    env = dict(os.environ, VD_TEST_STEP_DELAY="0.5")
    cmd = [sys.executable, "-m", "vdcli.app", "batch", str(folder / "m.yaml"), "--out", str(out),
           "--workers", "2", "--threads-per-worker", "1", "-q"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    edits = out / "a.vd" / "edits"  # appears once clip a's inversion stage has returned (all done flags set)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if edits.is_dir():
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the batch ended before it could be killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    r = batch(folder / "m.yaml", "--out", out, "--workers", 2, "--threads-per-worker", 1, "-q", "--json")
    assert r.exit_code == 1, r.output
    rep = report(r)
    a = next(c for c in rep["clips"] if c["name"] == "a")
    assert {"mask", "invert"} <= set(a["skipped"]), a
    assert rep["counts"]["stages_skipped"] >= 2 and rep["counts"]["stages_run"] <= 12 - 2
    assert_same_outputs(clean[0], out)
    again = report(batch(folder / "m.yaml", "--out", out, "--workers", 2, "-q", "--json"))
    assert again["counts"]["stages_run"] == 0 and again["counts"]["stages_skipped"] == 12
    assert again["model_loads"]["total"] == 0


@pytest.fixture
def s3(monkeypatch):
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("vd-test")
    yield fs
    server.stop()


def test_out_on_s3_syncs_after_each_stage_and_resumes_elsewhere(s3, folder, tmp_path):
    from stages.io.storage import MARKER, Storage

    s3.put_file(str(folder / "clips" / "a.mp4"), "vd-test/clips/a.mp4")
    manifest = tmp_path / "s3.yaml"
    manifest.write_text(MANIFEST.split("clips:\n")[0] + "clips:\n  - clip: s3://vd-test/clips/a.mp4\n")
    r = batch(manifest, "--out", "s3://vd-test/runs", "--scratch", tmp_path / "node1", "--threads-per-worker", 1,
              "-q", "--json")
    assert r.exit_code == 0, r.output
    rep = report(r)
    assert rep["clips"][0]["workspace"] == "s3://vd-test/runs/a.vd" and rep["counts"]["stages_run"] == 4
    marker = json.loads(s3.cat("vd-test/runs/a.vd/" + MARKER))
    assert marker["state"] == "clean" and "inversion/latents/zarr.json" in marker["files"]
    assert not any((tmp_path / "node1").glob("*/a.vd"))  # scratch copy removed once synced
    # another node (empty scratch) finds every stage complete on the remote
    again = report(batch(manifest, "--out", "s3://vd-test/runs", "--scratch", tmp_path / "node2", "-q", "--json"))
    assert again["counts"]["stages_skipped"] == 4 and again["model_loads"]["total"] == 0
    local = Storage("s3://vd-test/runs/a.vd", tmp_path / "back")
    assert local.pull()
    info = runner.invoke(app, ["info", str(local.local), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["inversion"]["status"] == "done"
    ev = runner.invoke(app, ["eval", str(local.local), "-m", "psnr", "--json"])
    assert ev.exit_code == 0, ev.output
    psnr = json.loads(ev.stdout)["items"]["reconstruction"]["metrics"]["psnr"]
    assert psnr == pytest.approx(rep["clips"][0]["metrics"]["reconstruction"]["psnr"])


def test_issue_example_manifest(tmp_path):
    from stages.batch.manifest import load_manifest

    write_clips(tmp_path, frames=8, size=128)
    (tmp_path / "m.yaml").write_text(EXAMPLE)
    plan = load_manifest(tmp_path / "m.yaml").clips[0]
    assert plan.name == "a" and plan.clip == str(tmp_path / "clips" / "a.mp4")
    assert (plan.mask.frames, plan.mask.size, plan.mask.box, plan.mask.box_only) == (8, "128", "40,40,100,100", True)
    assert (plan.invert.model, plan.invert.steps, plan.invert.null_steps) == ("tiny", 4, 2)
    assert plan.invert.subject == "red disc" and plan.edit_names == ["blue-cube", "green"]
    r = batch(tmp_path / "m.yaml", "--out", tmp_path / "runs", "--only", "mask", "-q", "--json")
    assert r.exit_code == 0, r.output
    from stages.io.workspace import Workspace

    raw = Workspace.open(tmp_path / "runs" / "a.vd").read("masks/raw")
    assert raw.shape == (8, 128, 128) and int(raw.sum()) == 8 * 60 * 60


def test_jsonl_manifest(tmp_path):
    from stages.batch.manifest import load_manifest

    (tmp_path / "m.jsonl").write_text('{"defaults": {"model": "tiny", "invert": {"steps": 3}}}\n'
                                      '{"clip": "x/a.mp4", "prompt": "a dog", "box": "1,1,9,9", "box_only": true}\n'
                                      '{"clip": "y/a.mp4", "prompt": "a cat", "points": [[5, 5]]}\n')
    plans = load_manifest(tmp_path / "m.jsonl").clips
    assert [p.name for p in plans] == ["a", "a-2"] and plans[1].mask.points == ["5,5"]
    assert plans[0].invert.steps == 3 and plans[0].invert.model == "tiny"



def test_lost_worker_result_has_the_shape_of_a_clip_result(tmp_path):
    from stages.batch.engines import _failure
    from stages.batch.manifest import load_manifest
    from stages.batch.worker import Job, Worker

    (tmp_path / "m.jsonl").write_text('{"clip": "gone.mp4", "prompt": "a dog", "box": "1,1,9,9", "box_only": true}\n')
    job = Job(load_manifest(tmp_path / "m.jsonl").clips[0], str(tmp_path / "runs" / "gone.vd"), ["mask"], None)
    ran = Worker(0, 1).run_clip(job)
    lost = _failure(job, "worker lost: node died")
    assert list(lost) == list(ran)  # same report columns, same order
    assert (ran["status"], ran["stage"], ran["transient"], ran["worker"]) == ("failed", "mask", False, 0)
    assert "gone.mp4 not found" in ran["error"]
    assert (lost["status"], lost["worker"], lost["transient"], lost["seconds"]) == ("failed", None, True, None)


BAD = [
    ("clips:\n  - {clip: a.mp4, promt: x}\n", "clips[0]: unknown key 'promt' (did you mean 'prompt'?)"),
    ("clips:\n  - {clip: a.mp4}\n", "clips[0]: missing `prompt:`"),
    ("clips:\n  - {clip: a.mp4, prompt: p, box: [50, 10, 20, 40], box_only: true}\n", "clips[0]: --box"),
    ("clips:\n  - {clip: a.mp4, prompt: p, box: [0, 0, 600, 40], box_only: true}\n", "outside the 512x512"),
    ("clips:\n  - {clip: a.mp4, prompt: p, box: [1, 1, 9, 9], name: x}\n  - {clip: b.mp4, prompt: p, box: [1, 1, 9, 9], name: x}\n",
     "clips[1]: duplicate name 'x' (also clips[0])"),
    ("clips:\n  - {clip: a.mp4, prompt: p, box: [1, 1, 9, 9], invert: {steps: four}}\n", "clips[0], invert: steps"),
    ("clips:\n  - {clip: a.mp4, prompt: a dog on grass, box: [1, 1, 9, 9], edits: [a cat on grass, "
     "{prompt: a red cat on grass, name: cat}]}\n",
     "edits[1]: duplicate edit name 'cat'"),
    ("defaults: {frames: 4, invert: {restart: true}}\nclips:\n  - {clip: a.mp4, prompt: p}\n", "invert.restart"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[-1][:24] for _, m in BAD])
def test_bad_manifest_is_one_error_and_runs_nothing(tmp_path, text, message):
    (tmp_path / "m.yaml").write_text(text)
    r = batch(tmp_path / "m.yaml", "--out", tmp_path / "runs", "-q")
    assert r.exit_code == 3, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vd: error: manifest ") and message in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_bad_options_and_retry_of_transient_failures(folder, tmp_path, monkeypatch):
    from stages.batch.worker import Worker

    r = batch(folder / "m.yaml", "--engine", "spark")
    assert r.exit_code == 2 and "--engine" in r.stderr
    real, calls = Worker._mask, []

    def flaky(self, plan, *args):
        calls.append(plan.name)
        if calls.count(plan.name) == 1:
            raise OSError("connection reset")
        return real(self, plan, *args)

    monkeypatch.setattr(Worker, "_mask", flaky)
    (tmp_path / "one.yaml").write_text(MANIFEST.split("clips:\n")[0].replace("clips/", "")
                                       + f"clips:\n  - clip: {folder / 'clips' / 'a.mp4'}\n")
    r = batch(tmp_path / "one.yaml", "--out", tmp_path / "runs", "--only", "mask", "-q", "--json")
    assert r.exit_code == 1 and "OSError: connection reset" in report(r)["failed"][0]["error"]
    calls.clear()
    r = batch(tmp_path / "one.yaml", "--out", tmp_path / "runs2", "--only", "mask", "--retry", "1", "-q", "--json")
    assert r.exit_code == 0, r.output
    assert report(r)["clips"][0]["attempt"] == 1 and calls == ["a", "a"]


def test_bench_batch_row_format():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vd_bench", Path(__file__).resolve().parents[1] / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = {"engine": "local", "workers": 2, "threads": 1, "clips": 4, "batch_s": 72.0, "process_s": 80.0,
           "clips_per_hour": 200.0, "loads": 2, "loads_per_worker": [1, 1]}
    text = bench.format_batch({"when": "w", "device": "d", "commit": "c", "settings": "s"}, [row])
    assert text.splitlines()[-1] == "| local | 2 | 1 | 4 | 72.0 | 80.0 | 200 | 2 (1, 1) |"
