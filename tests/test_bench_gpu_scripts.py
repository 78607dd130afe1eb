"""The GPU scripts (`make smoke-gpu`, `make bench-gpu`) have never run on a GPU here; their CPU paths run the
same code with the tiny model, so their plumbing cannot rot unnoticed before a GPU is lent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--device", "cpu", "--model", "tiny", "--px", "64", "--no-record"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *SMALL, *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


def test_smoke_gpu_on_the_cpu():
    out = run("smoke_gpu.py", "--frames", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "outputs finite" in out.stdout + out.stderr


def test_bench_gpu_on_the_cpu_every_level_equals_off():
    out = run("gpu.py", "--frames", "2", "--steps", "3", "--null-steps", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")][1:]  # past the head
    assert [r.split("|")[1].strip() for r in rows] == ["off", "blocks", "layers", "off"]
    assert all(r.rstrip(" |").endswith("yes") for r in rows[1:]), rows  # bitwise equal to the first off
