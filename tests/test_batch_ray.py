"""`vd batch --engine ray` on the local cluster vd starts (2 CPUs and one GPU resource, no CUDA, no
dashboard): no Ray process holds a secret of the driver's environment and its session folder holds no trace
of its tokens or paths, actors ask for --threads-per-worker CPUs and, by default on a cluster with GPUs, one
GPU (and run on the CPU where CUDA is absent), an unschedulable request stops with one line naming the
request and the cluster, a restarting actor is handed no clip, and a lost actor's clip is retried on a
healthy one. Tiny model, 4 frames, 64 px."""

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
SECRET_NAMES = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY"}
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
TWO = MANIFEST.replace("  - clip: a.mp4\n", "  - clip: a.mp4\n  - clip: b.mp4\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The local Ray cluster vd starts itself (secrets and paths in the driver's environment), sized for this
    machine (2 CPUs, one GPU resource); its session folder."""
    import ray

    from stages.batch.engines import EngineOptions, start_engine
    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    folder = tmp_path_factory.mktemp("ray")
    for name, seed in (("a", 0), ("b", 1)):
        write_mp4(folder / f"{name}.mp4", moving_disc(4, 64, 64, seed=seed)[0], fps=8.0)
    (folder / "m.yaml").write_text(MANIFEST)
    (folder / "two.yaml").write_text(TWO)
    temp = tempfile.mkdtemp(prefix="vdray", dir="/tmp")  # short: Ray's socket paths have a length limit
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SECRETS.items():
            mp.setenv(key, value)
        real, started = ray.init, {}

        def init(*args, **kwargs):  # vd's own ray.init, with this machine's resources
            started["info"] = real(*args, **{**kwargs, "num_cpus": 2, "num_gpus": 1, "_temp_dir": temp})
            return started["info"]

        mp.setattr(ray, "init", init)
        engine = start_engine(EngineOptions("ray", workers=1, threads_per_worker=1, gpus_per_worker=0), 1, ["cpu"],
                              lambda event: None)
        for actor in engine.actors:  # only the cluster is wanted: the tests start their own workers
            ray.kill(actor, no_restart=True)
        try:
            yield folder, Path(started["info"].address_info["session_dir"])
        finally:
            engine.close()
            shutil.rmtree(temp, ignore_errors=True)


def batch(folder: Path, out: str, *extra: str, manifest: str = "m.yaml"):
    return runner.invoke(app, ["batch", str(folder / manifest), "--engine", "ray", "--out", str(folder / out),
                               "-q", "--json", *extra])


def test_no_ray_process_holds_a_secret_of_the_driver(cluster):
    import psutil
    import ray

    @ray.remote(num_cpus=0)
    def environment() -> dict:
        return dict(os.environ)

    seen = ray.get(environment.remote())
    assert not SECRET_NAMES & set(seen) and os.environ["HF_TOKEN"] == SECRETS["HF_TOKEN"]
    leaks = []
    for proc in psutil.Process().children(recursive=True):  # GCS, raylet, agents, workers
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        leaks += [f"{proc.name()} {key}" for key, value in env.items()
                  if key in SECRET_NAMES or any(SECRETS[name] in value for name in SECRET_NAMES)]
    assert not leaks, leaks


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


def killing(monkeypatch, kill):
    """Run kill(event, engine) when clip a's inversion starts (the node "dies" while the clip runs)."""
    import stages.batch.run as batch_run

    real_printer, real_engine, engines, killed = batch_run.status_printer, batch_run.start_engine, [], []

    def printer(progress):
        show = real_printer(progress)

        def on_event(event):
            if event.get("kind") == "start" and event.get("stage") == "invert" and event.get("clip") == "a" \
                    and not killed:
                killed.append(event)
                kill(event, engines[0])
            show(event)

        return on_event

    def start_engine(*args, **kwargs):
        engines.append(real_engine(*args, **kwargs))
        return engines[0]

    monkeypatch.setattr(batch_run, "status_printer", printer)
    monkeypatch.setattr(batch_run, "start_engine", start_engine)
    return killed


def test_a_restarting_actor_is_handed_no_clip(cluster, monkeypatch):
    folder, _ = cluster
    killed = killing(monkeypatch, lambda event, engine: os.kill(event["pid"], signal.SIGKILL))
    r = batch(folder, "restart", "--only", "mask,invert", "--workers", "1", "--threads-per-worker", "1",
              "--gpus-per-worker", "0", manifest="two.yaml")
    assert r.exit_code == 0, r.output
    a, b = json.loads(r.stdout)["clips"]
    # the killed clip is rerun without --retry (its worker died, not the clip), on the restarted actor
    assert killed and a["status"] == "done" and a["lost_workers"] == 1 and a["attempt"] == 0
    assert b["status"] == "done", b["error"]  # it waited for the restarted actor
    assert b["pid"] != killed[0]["pid"] and b["run"] == ["mask", "invert"]


def test_a_lost_actors_clip_is_retried_on_a_healthy_actor(cluster, monkeypatch):
    import ray

    folder, _ = cluster
    killed = killing(monkeypatch, lambda event, engine: ray.kill(engine.actors[event["worker"]], no_restart=True))
    r = batch(folder, "lost", "--only", "mask,invert", "--workers", "2", "--threads-per-worker",
              "1", "--gpus-per-worker", "0", manifest="two.yaml")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    a, b = rep["clips"]
    assert killed and a["status"] == "done" and b["status"] == "done"
    assert a["lost_workers"] == 1 and a["attempt"] == 0 and a["worker"] != killed[0]["worker"]
    assert a["skipped"] == ["mask"] and a["run"] == ["invert"]  # the mask the lost actor made is kept
    assert any(w.get("lost") for w in rep["model_loads"]["per_worker"])
