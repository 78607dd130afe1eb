"""`vd invert --dry-run`: predicted peak memory per pass and an estimate of time per step, without loading
weights (nothing is written, no lock is taken).

Memory: stages.models.memory (measured by bench/memory.py on the SD1.5 + AnimateDiff v3 architecture).
Time (an estimate): forward-equivalents per step (ALGORITHM.md §8.2: a backward to the input about 1.2
forwards, a truncated GT forward 0.7; a checkpointed backward 0.7-0.75 more, bench/checkpointing.py)
x the FLOPs of one UNet forward (ARCHITECTURE.md §7: 1.1 TFLOP per frame at 512 px, scaled by the
latent tokens) / the device's throughput (a table of dense bf16 tensor peaks x 0.23, the utilisation
that the paper's A100 timing implies: 0.25 s per 16-frame 512 px forward, ALGORITHM.md §8.2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from stages.common.errors import InputError
from stages.invert.checkpointing import choose, invert_plan
from stages.invert.config import GROUP, InvertConfig, validate
from stages.io.workspace import Workspace
from stages.models import memory
from stages.models.oom import UNMODELLED, device_memory, gib

TFLOP_PER_FRAME_512 = 1.1  # one UNet forward, one frame at 512 x 512 (ARCHITECTURE.md §7)
GPU_UTILISATION = 0.23  # 17.7 TFLOP in 0.25 s on an A100 (312 TFLOP/s bf16 peak): ALGORITHM.md §8.2
# dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor data sheets), matched in order against the device name
GPU_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                   ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
                   ("V100", 125.0), ("T4", 65.0))
# effective float32 throughput per CPU thread: one no-grad full-architecture UNet forward at 128 px x 2
# frames took 3.38 CPU s (bench/checkpointing.py, bench/RESULTS.md 2026-12-03), i.e. 41 GFLOP/s
CPU_GFLOPS_PER_CORE = 41.0
# forward-equivalents (ALGORITHM.md §8.2)
GT_FE, FWD_FE, BWD_FE, BWD_WEIGHTS_FE = 0.7, 1.0, 1.2, 2.0
# what `--checkpointing blocks` adds per backward (bench/checkpointing.py: +0.75 and +0.67 no-grad forwards)
NULL_RECOMPUTE_FE, STDG_RECOMPUTE_FE = 0.75, 0.7


def memory_plan(ws: Workspace, cfg: InvertConfig, models: Any = None) -> Any:
    """The inversion's MemoryPlan (stages.models.oom) for `ws` and `cfg`; the checkpointing mode stored by
    the current run when there is one. `models`: the loaded models (else cfg.device / cfg.dtype)."""
    F, H, W = (int(v) for v in ws.array("video/frames").shape[:3])
    device, dtype = _device_dtype(cfg, models)
    plan = invert_plan(cfg, F, H, W, device, dtype)
    stored = (ws.group_attrs(GROUP).get("checkpointing") or {}).get("mode")
    return dataclasses.replace(plan, checkpointing=stored == "blocks")


def oom_plan(ws: Workspace, cfg: InvertConfig, progress: Any = None, models: Any = None, *_: Any,
             **__: Any) -> Any:
    """memory_plan for run_invert's own arguments (what stages.models.oom.oom_answered passes)."""
    return memory_plan(ws, cfg, models)


def _device_dtype(cfg: InvertConfig, models: Any = None) -> tuple[str, str]:
    """(device, memory-model dtype) without loading anything: fp32 on the CPU (the UNet runs in float32
    there), the compute dtype on a GPU."""
    from stages.invert.checkpointing import models_dtype
    from stages.models.ops import resolve_device, resolve_dtype

    if models is not None:
        return str(models.device), models_dtype(models)
    dev = resolve_device(cfg.device)
    if dev.type != "cuda":
        return "cpu" if dev.type == "cpu" else str(dev), "fp32"
    return str(dev), memory.canonical_dtype(str(resolve_dtype(cfg.dtype, dev)))


def _forward_equivalents(cfg: InvertConfig, windows: Any, checkpointing: bool) -> dict[str, float]:
    """Forward-equivalents per frame for one middle step (STDG on) and the DDIM inversion's step."""
    n = int(cfg.null_steps)
    stdg = any(cfg.coefficients()) or cfg.store_components
    if cfg.plain:  # the reference's structure (baseline.py), weights trainable
        per_step = 4 * (FWD_FE + FWD_FE + BWD_FE) + FWD_FE + n * (FWD_FE + BWD_WEIGHTS_FE) + 2 * FWD_FE
        return {"middle_step": per_step, "ddim_step": FWD_FE}
    recompute = NULL_RECOMPUTE_FE if checkpointing else 0.0
    inner = FWD_FE + BWD_FE + recompute + (FWD_FE if not windows.single else 0.0)  # windowed: a no-grad pass
    per_step = n * inner + FWD_FE  # the inner loop, then the final eps_u update
    if stdg:
        per_step += GT_FE + FWD_FE + BWD_FE + (STDG_RECOMPUTE_FE if checkpointing else 0.0)
    else:
        per_step += FWD_FE  # eps_c
    return {"middle_step": per_step, "ddim_step": FWD_FE}


def throughput(device: str, name: str, dtype: str) -> tuple[float | None, str]:
    """(effective TFLOP/s, where the figure comes from) for the device; None when no figure applies."""
    import os

    if device.startswith("cuda"):
        if dtype != "bf16":
            return None, "no figure for float32 on a GPU"
        for key, peak in GPU_PEAK_TFLOPS:
            if key.lower() in name.lower():
                return peak * GPU_UTILISATION, f"{key} {peak:g} TFLOP/s bf16 peak x {GPU_UTILISATION}"
        return None, f"no throughput figure for {name or 'this GPU'}"
    import torch

    threads = max(int(torch.get_num_threads()), 1)
    cores = min(threads, os.cpu_count() or threads)
    return CPU_GFLOPS_PER_CORE * cores / 1000, f"CPU {CPU_GFLOPS_PER_CORE:g} GFLOP/s per thread x {cores}"


def _passes(plan: Any) -> dict[str, dict[str, int | None]]:
    """Predicted peak per pass: {"pass": {"off": bytes, "blocks": bytes (grad passes)}} (None: not modelled)."""
    out: dict[str, dict[str, int | None]] = {}
    for name in memory.STAGE_PASSES["invert"]:
        frames = plan.frames if name.startswith("vae") else plan.per_call()
        modes = (False, True) if name in memory.GRAD_PASSES else (False,)
        row = {}
        for ck in modes:
            try:
                row["blocks" if ck else "off"] = (None if plan.model in UNMODELLED else memory.predict_peak(
                    name, frames, plan.height, plan.width, plan.dtype, ck))
            except ValueError:
                row["blocks" if ck else "off"] = None
        out[name] = row
    return out


def plan_invert(ws: Workspace, cfg: InvertConfig) -> dict[str, Any]:
    """What `vd invert` would need for `ws` and `cfg`: {frames, size, windows, device, memory {passes,
    peak, checkpointing}, time {seconds_per_step, seconds_total, basis}}; loads no weights, writes nothing."""
    from stages.invert.passes import clip_windows
    from stages.method.windows import MAX_WINDOW

    check = dataclasses.replace(cfg, prompt=cfg.prompt or "(dry run)", subject=cfg.subject if cfg.prompt else None)
    validate(check)
    if not ws.has("video/frames"):
        raise InputError(f"workspace {ws.path} has no video/frames; create it with `vd mask CLIP`")
    plan = memory_plan(ws, cfg)
    plan = dataclasses.replace(plan, checkpointing=False)
    windows = clip_windows(plan.frames, cfg, MAX_WINDOW)
    info = device_memory(plan.device)
    choice = choose(str(cfg.checkpointing), plan, info.get("available"))
    passes = _passes(plan)
    peaks = {mode: (max(vals) if all(v is not None for v in vals) else None)
             for mode in ("off", "blocks")
             for vals in [[row.get(mode, row["off"]) for row in passes.values()]]}
    fe = _forward_equivalents(cfg, windows, choice.enabled)
    frames_total = sum(e - s for s, e in windows.spans)
    tflop_fe = TFLOP_PER_FRAME_512 * (plan.height // 8) * (plan.width // 8) / memory.REF_TOKENS * frames_total
    tflops, source = throughput(plan.device, info.get("name") or "", plan.dtype)
    if plan.model in UNMODELLED:
        tflops, source = None, f"the FLOP figure is SD1.5 + AnimateDiff v3's, not --model {plan.model}'s"
    S = int(cfg.steps)
    per_step = fe["middle_step"] * tflop_fe / tflops if tflops else None
    total = (per_step * S + fe["ddim_step"] * tflop_fe / tflops * S) if tflops and per_step is not None else None
    return {
        "dry_run": True, "workspace": str(ws.path), "model": cfg.model, "frames": plan.frames,
        "height": plan.height, "width": plan.width, "window": int(cfg.window), "overlap": int(cfg.overlap),
        "windows": len(windows.spans), "frames_per_call": plan.per_call(), "device": info.get("device"),
        "device_name": info.get("name"), "dtype": plan.dtype, "steps": S, "null_steps": int(cfg.null_steps),
        "memory": {"estimate": True, "basis": "stages.models.memory (bench/memory.py, SD1.5 + AnimateDiff v3)",
                   "device_total": info.get("total"), "device_available": info.get("available"),
                   "passes": passes, "peak": peaks, "checkpointing": choice.attrs()},
        "time": {"estimate": True, "forward_equivalents_per_step": round(fe["middle_step"], 2),
                 "tflop_per_forward": round(tflop_fe, 3), "throughput_tflops": tflops,
                 "seconds_per_step": per_step, "seconds_total": total,
                 "basis": f"ALGORITHM.md §8.2 forward-equivalents (worst case, no early stop) x "
                          f"{TFLOP_PER_FRAME_512} TFLOP per 512 px frame-forward (ARCHITECTURE.md §7) / {source}"},
    }


def format_plan(result: dict[str, Any]) -> str:
    """The dry run as text."""
    mem = result["memory"]
    lines = [f"dry run for {result['workspace']}: {result['frames']} frames of {result['width']}x{result['height']}, "
             f"{result['windows']} window(s) of {result['frames_per_call']} frames, {result['device']}"
             + (f" ({result['device_name']})" if result.get("device_name") else "")
             + f", {result['dtype']}, model {result['model']}"]
    ck = mem["checkpointing"]
    lines.append(f"predicted peak memory per pass (estimate; {mem['basis']}):")
    for name, row in mem["passes"].items():
        cells = ", ".join(f"{mode} {gib(v) if v is not None else 'not modelled'}" for mode, v in row.items())
        lines.append(f"  {name:<11} {cells}")
    have = f"{gib(mem['device_available'])} free of {gib(mem['device_total'])}" if mem["device_total"] else "unknown"
    lines.append(f"device memory: {have}; checkpointing {ck['mode']} ({ck['reason']})")
    t = result["time"]
    if t["seconds_per_step"] is not None:
        lines.append(f"time per step (estimate): {t['seconds_per_step']:.1f} s, whole inversion about "
                     f"{t['seconds_total'] / 60:.1f} min ({t['forward_equivalents_per_step']} forward-equivalents "
                     f"per step; {t['basis']})")
    else:
        lines.append(f"time per step: no estimate ({t['basis']})")
    return "\n".join(lines)
