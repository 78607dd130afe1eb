"""Out of memory is an answer: OutOfMemory (exit 5) with one line naming the need, the device and the options;
the workspace stays resumable; `vd invert --dry-run` predicts memory and time without loading weights."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_workspace
from stages.common.errors import OutOfMemory
from stages.common.progress import Progress
from stages.invert import InvertConfig, run_invert
from stages.invert.checkpointing import unet_blocks
from stages.models import memory
from stages.models.oom import MemoryPlan, answer_oom, is_oom, oom_message
from vdcli.app import app

GIB = 1 << 30
runner = CliRunner()
# a measured-looking table: fp32 (CPU) and bf16, every pass, with and without checkpointing
ROWS = {"ddim": {"const": 2 * GIB, "per_frame": GIB // 4}, "edit": {"const": 2 * GIB, "per_frame": GIB // 4},
        "stdg": {"const": 2 * GIB, "per_frame": GIB}, "null_text": {"const": 2 * GIB, "per_frame": GIB},
        "stdg+blocks": {"const": 2 * GIB, "per_frame": GIB // 4},
        "null_text+blocks": {"const": 2 * GIB, "per_frame": GIB // 4},
        "stdg+layers": {"const": 2 * GIB, "per_frame": GIB // 8},
        "null_text+layers": {"const": 2 * GIB, "per_frame": GIB // 8},
        "vae_encode": {"const": GIB, "per_clip_frame": GIB // 8}, "vae_decode": {"const": GIB}}
WEIGHTS = {"unet": GIB // 2, "vae": 0, "text": 0}


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(memory, "COEFFICIENTS", {"fp32": ROWS, "bf16": ROWS})
    monkeypatch.setattr(memory, "WEIGHT_ELEMENTS", WEIGHTS)


def vd(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("vd: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.output, result.stderr
    return errors[0]


@pytest.fixture
def fail_after(monkeypatch):
    """fail_after(n, error): the UNet call after the first n raises `error` (the allocator failing)."""
    import stages.models.ops

    real = stages.models.ops.unet_eps

    def arm(n: int, error: BaseException) -> list[int]:
        calls = [0]

        def unet_eps(*a, **k):
            calls[0] += 1
            if calls[0] > n:
                raise error
            return real(*a, **k)

        monkeypatch.setattr(stages.models.ops, "unet_eps", unet_eps)
        return calls

    return arm


def test_what_counts_as_out_of_memory():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))  # only the allocator's errors
    with pytest.raises(ValueError, match="shapes"), answer_oom():
        raise ValueError("shapes")  # everything else passes unchanged


def test_numpy_running_out_of_memory_is_out_of_memory():
    with pytest.raises(MemoryError) as err:
        np.empty(1 << 62, dtype=np.uint8)  # 4 EiB: no allocator can give it
    assert is_oom(err.value)
    with pytest.raises(OutOfMemory, match="out of memory on cpu"), answer_oom(stage="mask"):
        np.empty(1 << 62, dtype=np.uint8)


def test_the_message_names_need_device_and_what_reduces_it(table):
    plan = MemoryPlan("invert", 32, 512, 512, "bf16", window=16, model="sd15-animatediff-v3", device="cuda:0")
    info = {"device": "cuda:0", "name": "NVIDIA L4", "total": 22 * GIB, "available": 3 * GIB}
    text = oom_message(plan, info)
    assert "\n" not in text
    assert text.startswith("out of memory on cuda:0 (NVIDIA L4, 22.0 GiB total, 3.0 GiB free) in vd invert")
    # need: weights 1 GiB + 2 GiB + 16 frames x 1 GiB; with layers (null text 1 + 2 + 16 x 0.125) the DDIM pass
    # is the largest: 1 + 2 + 16 x 0.25; window 8: 1 + 2 + 8 x 1; each plus the state of the frames outside the
    # window (3,906,560 bytes a frame at 512 px: 16 frames 0.06 GiB, 24 frames 0.09 GiB)
    assert "predicted need about 19.1 GiB (16 frames of 512x512 per UNet call, bf16, checkpointing off)" in text
    assert "reduce it with --checkpointing layers (about 7.1 GiB), --window 8 (about 11.1 GiB), " in text
    assert text.endswith("a smaller `vd mask --size` (e.g. 384)")
    blocks = MemoryPlan("invert", 8, 512, 512, "bf16", window=16, checkpointing="blocks", model="sd15-animatediff-v3")
    assert "checkpointing blocks); reduce it with --checkpointing layers (about 5.0 GiB)" in oom_message(blocks, info)
    on = MemoryPlan("invert", 8, 512, 512, "bf16", window=16, checkpointing="layers", model="sd15-animatediff-v3")
    text = oom_message(on, info)
    assert "--checkpointing" not in text.split("reduce it")[1] and "--window 8" not in text and "--size" in text
    assert "predicted need unknown" in oom_message(MemoryPlan("invert", 8, 64, 64, "fp32", model="tiny"), info)


def test_the_failed_call_releases_its_tensors():
    refs = []

    def work() -> None:
        held = torch.zeros(1000)
        refs.append(weakref.ref(held))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(OutOfMemory) as info:
        with answer_oom(MemoryPlan("edit", 16, 512, 512, "bf16", device="cpu")):
            work()
    assert info.value.exit_code == 5 and refs[0]() is None


def test_invert_out_of_memory_through_the_cli_then_resume(tmp_path, tiny, loads, table, fail_after, monkeypatch):
    # `loads` hands out tiny for sd15-random: the identity found from its files must say the same
    monkeypatch.setattr("stages.models.resolve.model_identity", lambda spec, *a, **k: tiny.fingerprint)
    ws = make_workspace(tmp_path / "ws")
    args = ("invert", ws.path, "--prompt", "a red disc", "--model", "sd15-random", "--steps", 3, "--null-steps", 2,
            "--device", "cpu", "--checkpointing", "off")
    fail_after(3 + 1 + 2 + 1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"))
    line = one_error_line(vd(*args), 5)  # DDIM (3 calls) and step 1 (eps_c, 2 inner, update) ran; step 2 failed
    assert line.startswith("vd: error: out of memory on cpu (") and " in vd invert: predicted need about " in line
    assert "4 frames of 64x64 per UNet call, fp32, checkpointing off" in line
    assert "--checkpointing layers (about" in line and "`vd mask --size`" in line
    done = ws.read("inversion/done")
    assert done.tolist() == [True, False, False, False]  # the finished step is kept
    assert ws.group_attrs("inversion")["checkpointing"]["mode"] == "off"
    assert all("forward" not in vars(b) for b in unet_blocks(tiny.unet))
    fail_after(10**9, RuntimeError("unused"))  # the allocator works again
    again = vd(*args[:-2], "--checkpointing", "blocks")
    assert again.exit_code == 0, again.output
    assert "resuming at step 2/3" in again.stderr  # a changed --checkpointing needs no --restart
    assert bool(ws.read("inversion/done").all())
    assert ws.group_attrs("inversion")["checkpointing"]["mode"] == "blocks"


def test_run_invert_raises_out_of_memory_for_batch(tiny, tmp_path, fail_after):
    """`vd batch` calls run_invert: it receives OutOfMemory itself (a VdError, exit code 5), the blocks are
    unwrapped and the stage lock released (an immediate rerun works)."""
    ws = make_workspace(tmp_path / "ws")
    cfg = InvertConfig(prompt="a red disc", model="tiny", steps=2, null_steps=1, device="cpu", checkpointing="blocks")
    fail_after(2, RuntimeError("CUDA error: out of memory"))
    with pytest.raises(OutOfMemory, match="predicted need unknown .*checkpointing blocks"):
        run_invert(ws, cfg, Progress(quiet=True), models=tiny)
    assert all("forward" not in vars(b) for b in unet_blocks(tiny.unet))
    fail_after(10**9, RuntimeError("unused"))
    out = run_invert(ws, cfg, Progress(quiet=True), models=tiny)
    assert out["steps"] == 2 and bool(ws.read("inversion/done").all())


def test_any_stage_falls_back_to_the_one_line_answer(tmp_path, monkeypatch):
    import stages.invert.plan

    def fail(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(stages.invert.plan, "plan_invert", fail)
    ws = make_workspace(tmp_path / "ws")
    line = one_error_line(vd("invert", ws.path, "--prompt", "a disc", "--dry-run"), 5)
    assert "out of memory on " in line and "--checkpointing layers" in line and "--window 8" in line


@pytest.fixture
def no_load(monkeypatch):
    import stages.models.load

    def refuse(*a, **k):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(stages.models.load, "load_models", refuse)


def test_dry_run_predicts_without_loading_or_writing(tmp_path, table, no_load):
    ws = make_workspace(tmp_path / "ws", frames=24)
    before = sorted(p.name for p in ws.path.iterdir())
    r = vd("invert", ws.path, "--prompt", "a disc", "--dry-run", "--json", "--device", "cpu", "--window", "8",
           "--overlap", "2", "--steps", 10)
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert (plan["frames"], plan["height"], plan["frames_per_call"], plan["windows"]) == (24, 64, 8, 4)
    mem = plan["memory"]
    # 64 px = 1/64 of 512 px's tokens: weights 2 GiB (fp32) + (2 GiB + 8 x 1 GiB) / 64 for the UNet passes, plus
    # the state of the 16 frames outside the window: (10 + 2) latents of 4 x 8 x 8 float32, a 77 x 768 float32
    # embedding and a 64 x 64 byte mask per frame
    state = 16 * (12 * 4 * 64 * 4 + 77 * 768 * 4 + 64 * 64)
    assert mem["passes"]["null_text"]["off"] == 2 * GIB + (2 * GIB + 8 * GIB) // 64 + state
    assert mem["passes"]["stdg"]["blocks"] == 2 * GIB + (2 * GIB + 8 * GIB // 4) // 64 + state
    assert mem["passes"]["vae_encode"]["off"] == 2 * GIB + (GIB + 24 * GIB // 8) // 64  # the whole clip, no state
    assert mem["passes"]["null_text"]["layers"] == 2 * GIB + (2 * GIB + 8 * GIB // 8) // 64 + state
    # with layers the DDIM pass (2 + 8 x 0.25, + state) is the largest
    assert mem["peak"] == {"off": mem["passes"]["null_text"]["off"], "blocks": 2 * GIB + 4 * GIB // 64 + state,
                           "layers": 2 * GIB + 4 * GIB // 64 + state}
    assert mem["checkpointing"]["mode"] == "off" and mem["estimate"] is True
    t = plan["time"]
    assert t["estimate"] is True and "ALGORITHM.md" in t["basis"] and "ARCHITECTURE.md" in t["basis"]
    assert t["seconds_per_step"] > 0 and t["seconds_total"] > 10 * t["seconds_per_step"]
    assert sorted(p.name for p in ws.path.iterdir()) == before and not ws.has("inversion")
    text = vd("invert", ws.path, "--prompt", "a disc", "--dry-run", "--device", "cpu")
    assert text.exit_code == 0 and "estimate" in text.stdout and "null_text" in text.stdout
    tiny = vd("invert", ws.path, "--prompt", "a disc", "--dry-run", "--device", "cpu", "--model", "tiny")
    assert tiny.exit_code == 0 and "not modelled" in tiny.stdout and "no estimate" in tiny.stdout


def test_dry_run_refuses_what_a_run_would(tmp_path, no_load):
    ws = make_workspace(tmp_path / "ws")
    r = vd("invert", ws.path, "--dry-run", "--window", "40")
    assert r.exit_code == 2 and "--window" in r.stderr
    np.testing.assert_equal(ws.has("inversion"), False)


def test_edit_out_of_memory_names_the_edit_pass_and_keeps_the_workspace(tmp_path, tiny, loads, table, fail_after):
    ws = make_workspace(tmp_path / "ws")
    done = vd("invert", ws.path, "--prompt", "a red disc", "--model", "sd15-random", "--steps", 2, "--null-steps", 1,
              "--device", "cpu")
    assert done.exit_code == 0, done.output
    fail_after(0, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB"))
    line = one_error_line(vd("edit", ws.path, "--prompt", "a blue disc", "--device", "cpu"), 5)
    # the injected table's edit pass: UNet weights 0.5 Gi elements x 4 bytes = 2 GiB, plus activations scaled by
    # the tokens (8x8 latents / 64x64 at 512 px = 1/64): (2 GiB + 4 frames x 0.25 GiB) / 64 = 0.047 GiB
    assert " in vd edit: predicted need about 2.0 GiB (4 frames of 64x64 per UNet call, fp32, " in line, line
    assert "--checkpointing" not in line and line.endswith("a smaller `vd mask --size` (e.g. 384)")
    assert not any(ws.has(f"edits/{name}/frames") for name in ("a-blue-disc", "blue-disc"))
    assert bool(ws.read("inversion/done").all())
