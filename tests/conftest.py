"""Shared fixtures: generated clips and ready-made workspaces (no downloads, CPU only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from stages.io.synthetic import moving_disc  # noqa: E402
from stages.io.workspace import Workspace  # noqa: E402

# Tiny models spend their time in thread hand-offs, not arithmetic: one thread is several times faster.
torch.set_num_threads(1)


def make_workspace(path: Path, frames: int = 4, size: int = 64, seed: int = 0,
                   objects: dict[str, tuple[np.ndarray, str | None]] | None = None) -> Workspace:
    """A workspace with frames and masks written directly (what `vd mask` would leave); `objects`
    {name: (mask (F, H, W), phrase or None)} also writes named objects (see write_objects)."""
    video, masks = moving_disc(frames, size, size, seed=seed)
    source = {"path": "synthetic", "sha256": f"synthetic-{frames}-{size}-{seed}", "frames": frames,
              "size": [size, size], "start": 0, "stride": 1, "fps": 8.0, "fps_out": 8.0}
    ws = Workspace.create(path, source)
    ws.write_array("video/frames", video)
    ws.write_array("masks/raw", masks)
    ws.write_array("masks/edit", masks)
    if objects:
        write_objects(ws, objects)
    return ws


def write_objects(ws: Workspace, objects: dict[str, tuple[np.ndarray, str | None]]) -> None:
    """The named-object contract of `vd mask`: masks/objects/<name>/{raw, edit} (here raw == edit), group
    attrs {names, phrases}, and masks/raw, masks/edit = their union."""
    union = None
    for name, (mask, _phrase) in objects.items():
        m = (np.asarray(mask) > 0).astype(np.uint8)
        ws.write_array(f"masks/objects/{name}/raw", m)
        ws.write_array(f"masks/objects/{name}/edit", m)
        union = m if union is None else np.maximum(union, m)
    ws.update_attrs("masks/objects", names=list(objects), phrases={n: p for n, (_m, p) in objects.items()})
    ws.write_array("masks/raw", union)
    ws.write_array("masks/edit", union)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random model (one per test module, so installed attention processors never leak across files)."""
    from stages.models.load import load_models

    return load_models("tiny", device="cpu")


@pytest.fixture
def loads(tiny, monkeypatch):
    """Make load_models hand out the module's tiny model; the list counts the loads (by spec)."""
    import stages.models.load

    calls: list[str] = []

    def fake_load(spec, **kw):
        calls.append(spec)
        return tiny

    monkeypatch.setattr(stages.models.load, "load_models", fake_load)
    return calls


@pytest.fixture
def interrupt_invert(monkeypatch):
    """Make the next `vd invert` in this process stop with Ctrl-C right after committing its first step."""
    import stages.invert.run

    calls: list[int] = []

    def interrupt_after_first_step():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(stages.invert.run, "_test_delay", interrupt_after_first_step)
    return calls


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A 4-frame 64x64 workspace with ground-truth masks."""
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def disc_clip() -> tuple[np.ndarray, np.ndarray]:
    """8 frames of 128x128 video and the ground-truth mask."""
    return moving_disc(8, 128, 128)
