"""bench/memory.py, the tool behind stages.models.memory's table, still runs every pass at every level (a
change in the stages can break its fake-tensor harness without any other test noticing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_pass_runs_on_fake_tensors_at_a_small_size(monkeypatch):
    import stages.models.ops as ops

    monkeypatch.setattr(ops, "_TIMESTEPS", {})  # the per-device timestep cache would keep fake tensors
    spec = importlib.util.spec_from_file_location("vd_bench_memory", ROOT / "bench" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    # every pass without checkpointing, the grad passes also with the finest level (a fake pass costs seconds)
    levels = ("off", bench.LEVELS[-1])
    points = bench.measure("bf16", (64,), (1,), bench.PASSES, levels, log=lambda line: None)
    got = {(p.pass_name, p.checkpointing): p for p in points}
    grad = {(name, level) for name in bench.GRAD_PASSES for level in levels}
    assert set(got) == grad | {(name, "off") for name in bench.PASSES}
    for key, p in got.items():
        assert p.peak > p.weights and "leaked" not in p.extra, key
    for name in bench.GRAD_PASSES:  # recomputing the layers keeps less
        assert got[(name, levels[1])].peak < got[(name, "off")].peak, name
