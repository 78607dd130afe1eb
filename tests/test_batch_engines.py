"""`vd batch` engine rules that need no cluster: what Ray actors may see of the environment, the default GPU
request, out-of-memory as a permanent failure with its hint, and a failed clip's log in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vdcli.app import app

runner = CliRunner()
ONE = """\
defaults: {{model: tiny, frames: 4, size: 64, box: [16, 16, 48, 48], box_only: true, prompt: "a red disc"}}
clips:
  - clip: {clip}
"""


def test_actors_get_only_allow_listed_settings():
    from stages.batch.engines import actor_env

    environ = {"HF_TOKEN": "hf_secret", "HUGGING_FACE_HUB_TOKEN": "hf_secret", "HF_HOME": "/home/me/hf",
               "HF_HUB_CACHE": "/data/hub", "VD_SD15": "/models/sd15", "VD_SAM2_DIR": "/models/sam2",
               "VD_MOTION_ADAPTER": "/models/mm", "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s",
               "AWS_SESSION_TOKEN": "t", "FSSPEC_S3_SECRET": "s", "VD_DOWNLOAD_MIRROR": "https://u:p@mirror",
               "HF_HUB_OFFLINE": "1", "VD_DEBUG": "1", "AWS_ENDPOINT_URL": "https://s3.example.org",
               "PATH": "/usr/bin", "HOME": "/home/me"}
    assert actor_env(3, environ) == {"HF_HUB_OFFLINE": "1", "VD_DEBUG": "1",
                                     "AWS_ENDPOINT_URL": "https://s3.example.org",
                                     "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}


def test_a_local_cluster_inherits_no_secret():
    from stages.batch.engines import node_env

    environ = {"HF_TOKEN": "hf_secret", "HUGGING_FACE_HUB_TOKEN": "hf_secret", "AWS_ACCESS_KEY_ID": "AKIA",
               "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "VD_DOWNLOAD_MIRROR": "https://u:p@mirror",
               "VD_API_TOKEN": "t", "GITHUB_TOKEN": "t", "PYTEST_CURRENT_TEST": "x", "HF_HOME": "/data/hf",
               "VD_SD15": "/models/sd15", "PATH": "/usr/bin", "HOME": "/home/me", "LC_ALL": "C.UTF-8",
               "RAY_DEDUP_LOGS": "0", "HF_HUB_OFFLINE": "1", "AWS_PROFILE": "batch"}
    assert node_env(environ) == {"HF_HOME": "/data/hf", "VD_SD15": "/models/sd15", "PATH": "/usr/bin",
                                 "HOME": "/home/me", "LC_ALL": "C.UTF-8", "RAY_DEDUP_LOGS": "0",
                                 "HF_HUB_OFFLINE": "1", "AWS_PROFILE": "batch"}


@pytest.mark.parametrize("devices,cluster,want", [
    (["cuda", "auto"], 0.0, 1.0),  # asked for CUDA: ask Ray for a GPU even before GPU nodes exist
    (["cpu", "cpu"], 4.0, 0.0),  # every clip on the CPU: no GPU held
    (["auto"], 2.0, 1.0), (["auto"], 0.0, 0.0)])
def test_default_gpus_per_worker(devices, cluster, want):
    from stages.batch.engines import default_gpus

    assert default_gpus(devices, cluster) == want


@pytest.fixture
def one_clip(tmp_path):
    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    video, _ = moving_disc(4, 64, 64, seed=0)
    write_mp4(tmp_path / "a.mp4", video, fps=8.0)
    (tmp_path / "m.yaml").write_text(ONE.format(clip=tmp_path / "a.mp4"))
    return tmp_path


def _run(folder: Path, *extra: str) -> tuple[dict, str]:
    r = runner.invoke(app, ["batch", str(folder / "m.yaml"), "--out", str(folder / "runs"), "--only", "mask",
                            "-q", "--json", *extra])
    assert r.exit_code == 1, r.output
    return json.loads(r.stdout), r.stderr


def test_out_of_memory_is_not_retried_and_keeps_its_hint(one_clip, monkeypatch):
    import torch

    from stages.batch.worker import Worker

    calls = []

    def oom(self, plan, *args):
        calls.append(plan.name)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Worker, "_mask", oom)
    rep, _ = _run(one_clip, "--retry", "2")
    clip = rep["clips"][0]
    assert calls == ["a"] and clip["attempt"] == 0 and clip["transient"] is False
    assert clip["error"].startswith("out of memory on ") and "in vd mask" in clip["error"]
    assert "reduce it with" in clip["error"] and "\n" not in clip["error"]


def test_numpy_out_of_memory_is_not_retried(one_clip, monkeypatch):
    import numpy as np

    from stages.batch.worker import Worker

    calls = []

    def hungry(self, plan, *args):
        calls.append(plan.name)
        np.zeros((1 << 30, 1 << 30), dtype=np.float32)  # 4 EiB: numpy raises MemoryError

    monkeypatch.setattr(Worker, "_mask", hungry)
    rep, _ = _run(one_clip, "--retry", "2")
    clip = rep["clips"][0]
    assert calls == ["a"] and clip["transient"] is False
    assert clip["error"].startswith("out of memory on cpu") and "in vd mask" in clip["error"]


def test_failed_clip_brings_its_log_to_the_report(one_clip, monkeypatch):
    import logging

    from stages.batch.worker import Worker

    def broken(self, plan, ws_path, job, log):
        log.log("decoding the clip")
        logging.getLogger("vd.test").warning("disk nearly full")
        raise RuntimeError("boom")

    monkeypatch.setattr(Worker, "_mask", broken)
    rep, stderr = _run(one_clip, "-v")
    failed = rep["failed"][0]
    assert failed["error"] == "RuntimeError: boom" and rep["clips"][0]["transient"] is True
    log = failed["log"]
    assert log[0] == "decoding the clip" and "vd.test: disk nearly full" in log
    assert log[-1] == "RuntimeError: boom" and any("in broken" in line for line in log)
    assert "[worker 0] a: decoding the clip" in stderr  # -v: the stages' lines as they run
