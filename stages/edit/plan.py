"""`vd edit --dry-run`: the predicted peak memory of the editing step and the decoder, and an estimate of the
time per step, on this machine or on a GPU not at hand (`--plan-for 12GB`); without a workspace for a clip
not yet masked (`--frames N --size WxH`). Loads no weights, writes nothing.

The editing step is one UNet call of 4 slots per window (stages.edit.sampling), no backward pass: no
checkpointing level changes it. The windows, steps and model are the workspace's inversion's (the defaults
of `vd invert` when there is none yet). Not modelled: --first-frame (SparseCtrl adds its own weights and
residuals) and per-region edits (their layout and blend maps); the memory rows are bench/memory.py's
"edit" step with SA-II, P2P and local-blend recording on at once.
"""

from __future__ import annotations

from typing import Any

from stages.invert import GROUP, InvertConfig
from stages.invert.plan import (TFLOP_PER_FRAME_512, Target, card_times, geometry, pass_rows, setting,
                                throughput, verdict)
from stages.io.workspace import Workspace
from stages.models import memory
from stages.models.oom import UNMODELLED

EDIT_PASSES = memory.STAGE_PASSES["edit"]
SLOTS = 4  # [edit-uncond, edit-cond, recon-uncond, recon-cond] per UNet call


def _inversion_settings(ws: Workspace | None) -> dict[str, Any]:
    """{model, steps, window, overlap, source}: the stored inversion's, else vd invert's defaults."""
    d = InvertConfig()
    out = {"model": d.model, "steps": int(d.steps), "window": int(d.window), "overlap": int(d.overlap),
           "source": "vd invert's defaults (no inversion in the workspace)" if ws is not None
           else "vd invert's defaults (no workspace)"}
    attrs = ws.group_attrs(GROUP) if ws is not None and ws.has(GROUP) else {}
    if attrs.get("steps"):
        spec = attrs.get("windows") or {}
        frames = int(ws.array("video/frames").shape[0]) if ws is not None and ws.has("video/frames") else 0
        out.update(model=str((attrs.get("model") or {}).get("spec") or d.model), steps=int(attrs["steps"]),
                   window=int(spec.get("window") or frames or d.window), overlap=int(spec.get("overlap") or 0),
                   source="the workspace's inversion")
    return out


def plan_edit_run(ws: Workspace | None, device: str = "auto", dtype: str = "auto", target: Target | None = None,
                  frames: int | None = None, size: tuple[int, int] | None = None, first_frame: bool = False,
                  regions: bool = False) -> dict[str, Any]:
    """What `vd edit` would need (the same keys as stages.invert.plan.plan_invert; memory.peak has every
    checkpointing level, all equal: editing has no backward pass)."""
    from stages.method.windows import plan_windows

    F, H, W = geometry(ws, frames, size)
    inv = _inversion_settings(ws)
    where = setting(device, dtype, target)
    window = min(int(inv["window"]), 32)
    windows = plan_windows(F, window, min(int(inv["overlap"]), window - 1))
    per_call = min(F, window)
    modelled = inv["model"] not in UNMODELLED
    rows = pass_rows(EDIT_PASSES, modelled, F, H, W, where, window, int(inv["steps"]))
    peaks = memory.peak_by_level(rows)
    S = int(inv["steps"])
    frames_total = sum(e - s for s, e in windows.spans)
    tflop_fe = TFLOP_PER_FRAME_512 * (H // 8) * (W // 8) / memory.REF_TOKENS * frames_total
    cards: list[dict[str, Any]] = []
    if not modelled:
        tflops, source = None, f"the FLOP figure is SD1.5 + AnimateDiff v3's, not {inv['model']}'s"
    elif target is not None:
        cards, source = card_times(target, where["mem_dtype"], SLOTS, SLOTS * S, tflop_fe)
        tflops = cards[0]["throughput_tflops"] if cards else None
    else:
        tflops, source = throughput(where["device"], where["name"] or "", where["mem_dtype"])
    alternatives: list[tuple[str, int | None]] = []
    for w in (16, 8, 4):
        if per_call > w and modelled:
            small = memory.predict_passes(EDIT_PASSES, F, H, W, where["mem_dtype"], w, where["device"],
                                          int(inv["steps"]))
            alternatives.append((f"`vd invert --window {w}` (edits use the inversion's windows)",
                                 memory.peak_by_level(small)["off"]))
    notes = [f"windows, steps and model: {inv['source']}"]
    if first_frame:
        notes.append("--first-frame: SparseCtrl's weights and residuals are not modelled (the need is higher)")
    if regions:
        notes.append("--region: the per-region layout and blend maps are not modelled")
    if where["mem_dtype"] == memory.CPU_AUTOCAST:
        notes.append("CPU autocast: float32 UNet weights + bf16 activations (predicted from the bf16 rows, "
                     "not measured)")
    return {
        "dry_run": True, "stage": "edit", "workspace": str(ws.path) if ws is not None else None,
        "model": inv["model"], "passes": list(EDIT_PASSES), "frames": F, "height": H, "width": W, "window": window,
        "overlap": windows.overlap, "windows": len(windows.spans), "frames_per_call": per_call,
        "device": where["device"], "device_name": where["name"], "dtype": where["dtype"], "steps": S,
        "memory": {"estimate": True, "basis": "stages.models.memory (bench/memory.py, SD1.5 + AnimateDiff v3)",
                   "model_dtype": where["mem_dtype"], "device_total": where["total"],
                   "device_available": where["available"], "passes": rows, "peak": peaks,
                   "checkpointing": {"requested": None, "mode": "off", "reason": "vd edit has no backward pass"},
                   "notes": notes},
        "time": {"estimate": True, "forward_equivalents_per_step": float(SLOTS),
                 "tflop_per_forward": round(tflop_fe, 3), "throughput_tflops": tflops,
                 "seconds_per_step": SLOTS * tflop_fe / tflops if tflops else None,
                 "seconds_total": SLOTS * S * tflop_fe / tflops if tflops else None, "cards": cards,
                 "basis": f"{SLOTS} slots per UNet call x {TFLOP_PER_FRAME_512} TFLOP per 512 px frame-forward "
                          f"(ARCHITECTURE.md §7) / {source}"},
        "target": target.attrs() if target is not None else None,
        "verdict": verdict(rows, "off", where["available"], target, alternatives),
    }
