"""`vd batch --engine ray` on a local cluster (2 CPUs and one GPU resource, no CUDA, no dashboard): no token
or path of the driver reaches Ray (its session folder holds no trace of them), actors ask for
--threads-per-worker CPUs and, by default on a cluster with GPUs, one GPU (and run on the CPU where CUDA is
absent), an unschedulable request stops with one line naming the request and the cluster, and a killed
actor is restarted by Ray with its clip retried. Tiny model, 4 frames, 64 px."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vdcli.app import app

runner = CliRunner()
CANARY = "vd-canary-7f3a9c"
SECRETS = {"HF_TOKEN": f"hf_{CANARY}", "HUGGING_FACE_HUB_TOKEN": f"hf_{CANARY}2",
           "AWS_SECRET_ACCESS_KEY": f"{CANARY}-aws", "HF_HOME": f"/{CANARY}/hf-home",
           "HF_HUB_CACHE": f"/{CANARY}/hub", "VD_SD15": f"/{CANARY}/sd15", "VD_SAM2_DIR": f"/{CANARY}/sam2"}
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
  eval: {metrics: [psnr]}
clips:
  - clip: a.mp4
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster started with secrets and paths in the driver's environment; its session folder."""
    import ray

    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    folder = tmp_path_factory.mktemp("ray")
    video, _ = moving_disc(4, 64, 64, seed=0)
    write_mp4(folder / "a.mp4", video, fps=8.0)
    (folder / "m.yaml").write_text(MANIFEST)
    temp = tempfile.mkdtemp(prefix="vdray", dir="/tmp")  # short: Ray's socket paths have a length limit
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SECRETS.items():
            mp.setenv(key, value)
        info = ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False,
                        log_to_driver=False, _temp_dir=temp)
        try:
            yield folder, Path(info.address_info["session_dir"])
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def batch(folder: Path, out: str, *extra: str):
    return runner.invoke(app, ["batch", str(folder / "m.yaml"), "--engine", "ray", "--out", str(folder / out),
                               "-q", "--json", *extra])


def test_no_token_or_path_reaches_ray_and_actors_ask_for_their_threads(cluster):
    folder, session = cluster
    r = batch(folder, "plain", "--only", "mask", "--threads-per-worker", "2")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    (worker,) = rep["model_loads"]["per_worker"]
    assert worker["resources"] == {"CPU": 2.0, "GPU": 1.0} and worker["pid"] != os.getpid()
    leaks = []
    for path in session.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if CANARY.encode() in path.read_bytes():
                    leaks.append(str(path.relative_to(session)))
            except OSError:
                pass
    assert not leaks, leaks
    try:  # the state API needs the dashboard (ray[default]); where it is there, its listing is clean too
        from ray.util.state import list_actors

        listing = str(list_actors(detail=True))
    except Exception:
        listing = ""
    assert CANARY not in listing


def test_unschedulable_workers_stop_with_one_line(cluster):
    folder, _ = cluster
    r = batch(folder, "gpu", "--only", "mask", "--gpus-per-worker", "2", "--schedule-timeout", "2")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vd: error: no Ray worker started within 2 s"), lines
    assert "ask for CPU 2, GPU 2 per worker" in lines[0] and "available (of CPU 2, GPU 1)" in lines[0]


def test_killed_actor_is_restarted_and_its_clip_retried(cluster, monkeypatch):
    import stages.batch.run as batch_run

    folder, _ = cluster
    real, killed = batch_run.status_printer, []

    def killing(progress):
        show = real(progress)

        def on_event(event):
            if event.get("kind") == "start" and event.get("stage") == "invert" and not killed:
                killed.append(event["pid"])
                os.kill(event["pid"], signal.SIGKILL)  # the node "dies" while the clip runs
            show(event)

        return on_event

    monkeypatch.setattr(batch_run, "status_printer", killing)
    r = batch(folder, "killed", "--retry", "1", "--threads-per-worker", "1", "--gpus-per-worker", "0")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["model_loads"]["per_worker"][0]["resources"] == {"CPU": 1.0}
    clip = rep["clips"][0]
    assert killed and clip["status"] == "done" and clip["pid"] != killed[0]
    assert clip["run"] == ["invert", "edit", "eval"] and clip["skipped"] == ["mask"]  # mask kept from before
