"""`vd invert --dry-run`: predicted peak memory per pass and an estimate of time per step, without loading
weights (nothing is written, no lock is taken); `--plan-for 12GB` plans for a GPU that is not at hand, and
`--frames N --size WxH` for a clip not yet masked.

Memory: stages.models.memory (measured by bench/memory.py on the SD1.5 + AnimateDiff v3 architecture), only
the passes the method runs (direct inversion has no backward pass). Planning for a card subtracts
memory.CUDA_CONTEXT_ALLOWANCE (0.5 GiB, an assumption) from its nominal memory for the CUDA context.
Time (an estimate): forward-equivalents per step (ALGORITHM.md §8.2: a backward to the input about 1.2
forwards, a truncated GT forward 0.7; a checkpointed backward 0.7-0.75 more, bench/checkpointing.py)
x the FLOPs of one UNet forward (ARCHITECTURE.md §7: 1.1 TFLOP per frame at 512 px, scaled by the
latent tokens) / the device's throughput (a table of dense bf16 tensor peaks x 0.23, the utilisation
that the paper's A100 timing implies: 0.25 s per 16-frame 512 px forward, ALGORITHM.md §8.2).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from stages.common.errors import InputError, UsageError
from stages.invert.checkpointing import Choice, choose, grad_passes, invert_plan
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
# --plan-for card classes: nominal memory in GiB (a GPU's "12 GB" is binary) -> (card, dense bf16/fp16 tensor
# peak with FP32 accumulate, TFLOP/s), the slowest first. Data-sheet figures; the GeForce cards not in
# GPU_PEAK_TFLOPS are derived as SMs x boost clock x 512 FLOP per clock per SM (Ampere/Ada GeForce), estimates.
CARD_CLASSES: dict[int, tuple[tuple[str, float], ...]] = {
    12: (("RTX 3060 12GB", 25.5), ("RTX 4070", 58.3)),
    16: (("RTX 4060 Ti 16GB", 44.1), ("RTX 4080", 97.5)),
    24: (("RTX 3090", 71.0), ("RTX 4090", 165.0)),
    40: (("A100 40GB", 312.0),),
    48: (("RTX A6000", 154.8), ("L40S", 362.0)),
    80: (("A100 80GB", 312.0), ("H100 SXM", 989.0)),
}
# effective float32 throughput per CPU thread: one no-grad full-architecture UNet forward at 128 px x 2
# frames took 3.38 CPU s (bench/checkpointing.py, bench/RESULTS.md 2026-12-03), i.e. 41 GFLOP/s
CPU_GFLOPS_PER_CORE = 41.0
# forward-equivalents (ALGORITHM.md §8.2)
GT_FE, FWD_FE, BWD_FE, BWD_WEIGHTS_FE = 0.7, 1.0, 1.2, 2.0
# what `--checkpointing blocks` or `layers` adds per backward (bench/checkpointing.py: +0.75 and +0.67 no-grad
# forwards; both levels recompute the forward once and cost the same, 2026-12-06)
NULL_RECOMPUTE_FE, STDG_RECOMPUTE_FE = 0.75, 0.7
RUN_DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
              "float16": "fp16", "half": "fp16"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU to plan for (--plan-for): nominal memory, what is left for tensors, its card class (if any)."""

    name: str  # as given, normalised: "12GB", "20GiB"
    total: int  # nominal bytes
    usable: int  # total - memory.CUDA_CONTEXT_ALLOWANCE
    cards: tuple[tuple[str, float], ...] = ()  # (card, dense bf16 TFLOP/s) of the class; () when none

    def describe(self) -> str:
        cards = f": {' ... '.join(c for c, _ in self.cards)}" if self.cards else ""
        return f"a {self.name} card{cards}"

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.total, "allowance_bytes": self.total - self.usable,
                "usable_bytes": self.usable, "cards": [c for c, _ in self.cards],
                "allowance": "CUDA context and cuBLAS/cuDNN workspaces (an assumption, not measured)"}


def parse_target(text: str) -> Target:
    """--plan-for: "12GB", "24gb", "20GiB", "10.5GiB" (GPU GB are binary: N GB = N GiB); UsageError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gb|gib|g)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UsageError(f"--plan-for {text!r}: expected a card size such as 12GB, 16GB, 24GB, 40GB, 80GB or 20GiB")
    size = float(match.group(1))
    low = memory.CUDA_CONTEXT_ALLOWANCE / memory.GIB
    if not low < size <= 4096:
        raise UsageError(f"--plan-for {text!r}: the size must be above {low:g} GiB (the CUDA context's allowance) "
                         f"and at most 4096 GiB")
    unit = "GiB" if (match.group(2) or "").lower() == "gib" else "GB"
    total = int(size * memory.GIB)
    cards = CARD_CLASSES.get(int(size), ()) if size.is_integer() else ()
    return Target(f"{size:g}{unit}", total, total - memory.CUDA_CONTEXT_ALLOWANCE, cards)


def parse_frames(frames: int | None) -> int | None:
    """--frames N of a planned clip (1..100000) or None."""
    if frames is None:
        return None
    if not 1 <= int(frames) <= 100000:
        raise UsageError(f"--frames must be in 1..100000, got {frames}")
    return int(frames)


def run_dtype(dtype: str | None, cuda: bool) -> str:
    """The dtype a run uses, by name (fp32, bf16 or fp16): auto is bf16 on a GPU, fp32 on the CPU."""
    name = str(dtype or "auto").lower().removeprefix("torch.")
    if name == "auto":
        return "bf16" if cuda else "fp32"
    if name not in RUN_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)")
    return RUN_DTYPES[name]


def model_dtype(run: str, cuda: bool) -> str:
    """The memory model's dtype for a run dtype: the measured rows on a GPU, CPU autocast otherwise."""
    if run == "fp32":
        return "fp32"
    return memory.canonical_dtype(run) if cuda else memory.CPU_AUTOCAST


def memory_plan(ws: Workspace, cfg: InvertConfig, models: Any = None) -> Any:
    """The inversion's MemoryPlan (stages.models.oom) for `ws` and `cfg`; the checkpointing mode stored by
    the current run when there is one. `models`: the loaded models (else cfg.device / cfg.dtype)."""
    F, H, W = (int(v) for v in ws.array("video/frames").shape[:3])
    device, dtype = _device_dtype(cfg, models)
    plan = invert_plan(cfg, F, H, W, device, dtype)
    stored = (ws.group_attrs(GROUP).get("checkpointing") or {}).get("mode")
    return dataclasses.replace(plan, checkpointing=stored if stored in memory.LEVELS else "off")


def oom_plan(ws: Workspace, cfg: InvertConfig, progress: Any = None, models: Any = None, *_: Any,
             **__: Any) -> Any:
    """memory_plan for run_invert's own arguments (what stages.models.oom.oom_answered passes)."""
    return memory_plan(ws, cfg, models)


def _device_dtype(cfg: Any, models: Any = None) -> tuple[str, str]:
    """(device, memory-model dtype) without loading anything: fp32 on the CPU unless --dtype asks for bf16/fp16
    (then CPU autocast, memory.CPU_AUTOCAST), the compute dtype on a GPU. cfg: anything with .device, .dtype."""
    from stages.models.ops import resolve_device, resolve_dtype

    if models is not None:
        cuda = models.device.type == "cuda"
        name = str(models.dtype).removeprefix("torch.")
        return str(models.device), model_dtype(run_dtype(name, cuda), cuda)
    try:
        dev = resolve_device(cfg.device)
    except UsageError as exc:
        if str(cfg.device).startswith("cuda"):
            raise UsageError(f"{exc}; plan for a GPU from this machine with --dry-run --plan-for 12GB (or 16GB, "
                             f"24GB, 40GB, 80GB, <N>GiB)") from None
        raise
    if dev.type != "cuda":
        where = "cpu" if dev.type == "cpu" else str(dev)
        return where, model_dtype(run_dtype(cfg.dtype, False), False)
    return str(dev), memory.canonical_dtype(str(resolve_dtype(cfg.dtype, dev)))


def pass_rows(passes: tuple[str, ...], modelled: bool, frames: int, height: int, width: int, where: dict[str, Any],
              window: int | None, steps: int) -> dict[str, dict[str, int | None]]:
    """A dry run's {pass: {level: bytes}} (memory.predict_passes on the plan's device and dtype, `where` from
    `setting`); None for each level of a pass the model does not cover (an unmodelled model, a missing row)."""
    rows: dict[str, dict[str, int | None]] = {}
    for name in passes:
        levels = memory.LEVELS if name in memory.GRAD_PASSES else memory.LEVELS[:1]
        try:
            rows[name] = memory.predict_passes((name,), frames, height, width, where["mem_dtype"], window,
                                               where["device"], steps)[name] if modelled else dict.fromkeys(levels)
        except ValueError:
            rows[name] = dict.fromkeys(levels)
    return rows


def invert_passes(cfg: InvertConfig) -> tuple[str, ...]:
    """The memory model's passes this inversion runs, in order: direct has no backward pass, negative-prompt
    no null-text iterations, --no-stdg no STDG grad pass."""
    return ("vae_encode", "ddim") + grad_passes(cfg) + ("vae_decode",)


def forward_equivalents(cfg: InvertConfig, windows: Any, checkpointing: bool) -> dict[str, float]:
    """Forward-equivalents per frame for one middle step (STDG on) and the DDIM inversion's step."""
    n = int(cfg.null_steps) if cfg.method == "null-text" else 0  # negative-prompt: no Adam iteration
    stdg = any(cfg.coefficients()) or cfg.store_components
    if cfg.plain:  # the reference's structure (baseline.py), weights trainable
        per_step = 4 * (FWD_FE + FWD_FE + BWD_FE) + FWD_FE + n * (FWD_FE + BWD_WEIGHTS_FE) + 2 * FWD_FE
        return {"middle_step": per_step, "ddim_step": FWD_FE}
    if cfg.method == "direct":  # eps_u and eps_c without grad; the STDG targets come from eps_c's forward
        per_step = 2 * FWD_FE + (GT_FE if stdg and cfg.schedule == "reference" else 0.0)
        return {"middle_step": per_step, "ddim_step": FWD_FE}
    recompute = NULL_RECOMPUTE_FE if checkpointing else 0.0
    inner = FWD_FE + BWD_FE + recompute + (FWD_FE if not windows.single else 0.0)  # windowed: a no-grad pass
    per_step = n * inner + FWD_FE  # the inner loop, then the final eps_u update
    if stdg:
        backward = BWD_FE + (STDG_RECOMPUTE_FE if checkpointing else 0.0)
        per_step += GT_FE + FWD_FE + backward * (5 if cfg.store_components else 1)  # 4 more: one per component
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
    if dtype != "fp32":
        return None, "the CPU figure is float32's; no figure for bf16 autocast on a CPU"
    import torch

    threads = max(int(torch.get_num_threads()), 1)
    cores = min(threads, os.cpu_count() or threads)
    return CPU_GFLOPS_PER_CORE * cores / 1000, f"CPU {CPU_GFLOPS_PER_CORE:g} GFLOP/s per thread x {cores}"


def card_times(target: Target, mem_dtype: str, forwards: float, steps_forwards: float,
               tflop_fe: float) -> tuple[list[dict[str, Any]], str]:
    """Per card of the target's class: effective TFLOP/s, seconds per step and in total (estimates).
    forwards: forward-equivalents of one step; steps_forwards: of the whole run."""
    if mem_dtype != "bf16":
        return [], "no figure for float32 on a GPU"
    if not target.cards:
        classes = ", ".join(f"{k}GB" for k in CARD_CLASSES)
        return [], f"no card class for {target.name} (time estimates exist for {classes})"
    rows = []
    for card, peak in target.cards:
        eff = peak * GPU_UTILISATION
        rows.append({"card": card, "peak_tflops": peak, "throughput_tflops": eff,
                     "seconds_per_step": forwards * tflop_fe / eff, "seconds_total": steps_forwards * tflop_fe / eff})
    basis = (f"{' / '.join(f'{c} {p:g}' for c, p in target.cards)} TFLOP/s dense bf16 peak (data sheets; GeForce "
             f"figures derived from SMs x clock) x {GPU_UTILISATION} utilisation")
    return rows, basis


def setting(device: str, dtype: str, target: Target | None) -> dict[str, Any]:
    """Where the plan runs: {device, name, dtype (the run's), mem_dtype (the memory model's), total, available}."""
    if target is not None:
        run = run_dtype(dtype, True)
        return {"device": "cuda", "name": target.describe(), "dtype": run, "mem_dtype": model_dtype(run, True),
                "total": target.total, "available": target.usable}
    from types import SimpleNamespace

    dev, mem = _device_dtype(SimpleNamespace(device=device, dtype=dtype))
    info = device_memory(dev)
    cuda = dev.startswith("cuda")
    return {"device": info.get("device") or dev, "name": info.get("name"), "dtype": run_dtype(dtype, cuda),
            "mem_dtype": mem, "total": info.get("total"), "available": info.get("available")}


def geometry(ws: Workspace | None, frames: int | None = None, size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(frames, height, width) of the clip planned for: the workspace's, overridden by --frames / --size."""
    if ws is not None and (frames is None or size is None):
        if not ws.has("video/frames"):
            raise InputError(f"workspace {ws.path} has no video/frames; create it with `vd mask CLIP` (or plan "
                             f"without one: --frames N --size WxH)")
        F, H, W = (int(v) for v in ws.array("video/frames").shape[:3])
    elif frames is None or size is None:
        raise UsageError("planning without a workspace needs both --frames N and --size WxH")
    else:
        F, H, W = 0, 0, 0
    F = parse_frames(frames) or F
    if size is not None:
        H, W = int(size[0]), int(size[1])
    return F, H, W


def verdict(rows: dict[str, dict[str, int | None]], level: str, available: int | None, target: Target | None,
            alternatives: list[tuple[str, int | None]]) -> dict[str, Any] | None:
    """Whether the stage's peak at `level` fits `available` bytes; alternatives: (option text, peak) tried in
    order when it does not. None without a known device memory."""
    peak = memory.peak_by_level(rows)[level]
    if available is None or peak is None:
        return None
    fits = peak <= available
    where = f"a {target.name} card" if target is not None else "this device"
    out: dict[str, Any] = {"fits": fits, "level": level, "peak": peak, "available": available,
                           "margin": available - peak, "suggestion": None}
    if fits:
        out["text"] = f"fits {where}: {gib(peak)} of {gib(available)} usable ({gib(available - peak)} to spare)"
        return out
    ok = next(((opt, p) for opt, p in alternatives if p is not None and p <= available), None)
    out["suggestion"] = ok[0] if ok else "a smaller `vd mask --size`"
    hint = f"fits with {ok[0]} (about {gib(ok[1])})" if ok else "use a smaller `vd mask --size`"
    out["text"] = f"does not fit {where}: needs {gib(peak)}, {gib(available)} usable; {hint}"
    return out


def _alternatives(cfg: InvertConfig, passes: tuple[str, ...], F: int, H: int, W: int, dtype: str, per_call: int,
                  choice: Choice, available: int | None, device: str) -> list[tuple[str, int | None]]:
    """(options, predicted stage peak) that lower the need, in the order to try them: the checkpointing levels
    above the chosen one, then shorter windows, each with the cheapest level that fits there (auto takes it on
    a GPU; elsewhere the option names it)."""
    levels = memory.LEVELS if any(p in memory.GRAD_PASSES for p in passes) else memory.LEVELS[:1]
    steps = int(cfg.steps)
    here = memory.peak_by_level(memory.predict_passes(passes, F, H, W, dtype, per_call, device, steps))
    out: list[tuple[str, int | None]] = [(f"--checkpointing {lv}", here[lv])
                                         for lv in levels[levels.index(choice.mode) + 1:]]
    for w in (16, 8, 4):
        if per_call <= w:
            continue
        peaks = memory.peak_by_level(memory.predict_passes(passes, F, H, W, dtype, w, device, steps))
        level = next((lv for lv in levels if available is not None and peaks[lv] is not None
                      and peaks[lv] <= available), levels[-1])
        if cfg.checkpointing in levels and levels.index(cfg.checkpointing) > levels.index(level):
            level = cfg.checkpointing  # an explicit level saving more is kept
        text = f"--window {w}" + (f" --overlap {w // 2}" if int(cfg.overlap) >= w else "")
        auto_takes_it = cfg.checkpointing == "auto" and device.startswith("cuda")
        if level != "off" and level != cfg.checkpointing and not auto_takes_it:
            text += f" --checkpointing {level}"
        out.append((text, peaks[level]))
    return out


def _choice(cfg: InvertConfig, passes: tuple[str, ...], mplan: Any, available: int | None) -> Choice:
    """The checkpointing the run would use: stages.invert.checkpointing.choose (what run_invert calls)."""
    choice = choose(str(cfg.checkpointing), mplan, available)
    if not any(p in memory.GRAD_PASSES for p in passes):
        what = "direct inversion" if cfg.method == "direct" else f"--method {cfg.method} without STDG"
        choice = dataclasses.replace(choice, reason=f"{choice.reason}; no effect: {what} has no backward pass")
    return choice


def plan_invert(ws: Workspace | None, cfg: InvertConfig, target: Target | None = None, frames: int | None = None,
                size: tuple[int, int] | None = None) -> dict[str, Any]:
    """What `vd invert` would need for `ws` (None: a clip of `frames` x `size` not yet masked) and `cfg`, on
    this machine or on `target` (--plan-for): {frames, size, windows, device, dtype, method, memory {passes,
    peak, checkpointing}, time {seconds_per_step, seconds_total, basis}, target, verdict}; loads no weights,
    writes nothing."""
    from stages.invert.passes import clip_windows
    from stages.method.windows import MAX_WINDOW

    check = dataclasses.replace(cfg, prompt=cfg.prompt or "(dry run)", subject=cfg.subject if cfg.prompt else None)
    validate(check)
    F, H, W = geometry(ws, frames, size)
    where = setting(cfg.device, cfg.dtype, target)
    mplan = invert_plan(cfg, F, H, W, where["device"], where["mem_dtype"])
    windows = clip_windows(F, cfg, MAX_WINDOW)
    passes = invert_passes(cfg)
    modelled = cfg.model not in UNMODELLED
    rows = pass_rows(passes, modelled, F, H, W, where, mplan.per_call(), int(cfg.steps))
    peaks = memory.peak_by_level(rows)
    choice = _choice(cfg, passes, mplan, where["available"])
    fe = forward_equivalents(cfg, windows, choice.enabled)
    frames_total = sum(e - s for s, e in windows.spans)
    tflop_fe = TFLOP_PER_FRAME_512 * (H // 8) * (W // 8) / memory.REF_TOKENS * frames_total
    S = int(cfg.steps)
    run_fe = (fe["middle_step"] + fe["ddim_step"]) * S
    cards: list[dict[str, Any]] = []
    if not modelled:
        tflops, source = None, f"the FLOP figure is SD1.5 + AnimateDiff v3's, not --model {cfg.model}'s"
    elif target is not None:
        cards, source = card_times(target, where["mem_dtype"], fe["middle_step"], run_fe, tflop_fe)
        tflops = cards[0]["throughput_tflops"] if cards else None
    else:
        tflops, source = throughput(where["device"], where["name"] or "", where["mem_dtype"])
    per_step = fe["middle_step"] * tflop_fe / tflops if tflops else None
    total = run_fe * tflop_fe / tflops if tflops else None
    alternatives = _alternatives(cfg, passes, F, H, W, where["mem_dtype"], mplan.per_call(), choice,
                                 where["available"], where["device"]) if modelled else []
    notes = []
    if cfg.plain:
        notes.append("--plain holds weight gradients and explicit attention maps: not modelled, the figures are "
                     "the optimised path's")
    if where["mem_dtype"] == memory.CPU_AUTOCAST:
        notes.append("CPU autocast: float32 UNet weights + bf16 activations (predicted from the bf16 rows, "
                     "not measured)")
    return {
        "dry_run": True, "workspace": str(ws.path) if ws is not None else None, "model": cfg.model,
        "method": cfg.method, "passes": list(passes), "frames": F, "height": H, "width": W,
        "window": int(cfg.window), "overlap": int(cfg.overlap), "windows": len(windows.spans),
        "frames_per_call": mplan.per_call(), "device": where["device"], "device_name": where["name"],
        "dtype": where["dtype"], "steps": S, "null_steps": int(cfg.null_steps) if cfg.method == "null-text" else 0,
        "memory": {"estimate": True, "basis": "stages.models.memory (bench/memory.py, SD1.5 + AnimateDiff v3)",
                   "model_dtype": where["mem_dtype"], "device_total": where["total"],
                   "device_available": where["available"], "passes": rows, "peak": peaks,
                   "checkpointing": choice.attrs(), "notes": notes},
        "time": {"estimate": True, "forward_equivalents_per_step": round(fe["middle_step"], 2),
                 "tflop_per_forward": round(tflop_fe, 3), "throughput_tflops": tflops,
                 "seconds_per_step": per_step, "seconds_total": total, "cards": cards,
                 "basis": f"ALGORITHM.md §8.2 forward-equivalents (worst case, no early stop) x "
                          f"{TFLOP_PER_FRAME_512} TFLOP per 512 px frame-forward (ARCHITECTURE.md §7) / {source}"},
        "target": target.attrs() if target is not None else None,
        "verdict": verdict(rows, choice.mode, where["available"], target, alternatives),
    }


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_time(t: dict[str, Any], what: str) -> str:
    """The time line of a plan (estimates)."""
    if t.get("cards"):
        per = ", ".join(f"{c['seconds_per_step']:.1f} s on an {c['card']}" for c in t["cards"])
        whole = " to ".join(_minutes(c["seconds_total"]) for c in t["cards"])
        return (f"time per step (estimate): {per}; whole {what} about {whole} ({t['forward_equivalents_per_step']} "
                f"forward-equivalents per step; {t['basis']})")
    if t["seconds_per_step"] is not None:
        return (f"time per step (estimate): {t['seconds_per_step']:.1f} s, whole {what} about "
                f"{_minutes(t['seconds_total'])} ({t['forward_equivalents_per_step']} forward-equivalents "
                f"per step; {t['basis']})")
    return f"time per step: no estimate ({t['basis']})"


def format_head(result: dict[str, Any]) -> str:
    """The first line of a plan: the clip, the windows, where it runs."""
    what = f"dry run for {result['workspace']}" if result.get("workspace") else "dry run for a clip not yet masked"
    where = result["device"] + (f" ({result['device_name']})" if result.get("device_name") else "")
    if result.get("target"):
        t = result["target"]
        where = (f"planned for {result['device_name']} ({result['device']}; {gib(t['usable_bytes'])} for tensors: "
                 f"{gib(t['bytes'])} less {gib(t['allowance_bytes'])} for the CUDA context, an assumption)")
    return (f"{what}: {result['frames']} frames of {result['width']}x{result['height']}, {result['windows']} "
            f"window(s) of {result['frames_per_call']} frames, {where}, {result['dtype']}, model {result['model']}")


def format_plan(result: dict[str, Any]) -> str:
    """The dry run as text (an inversion's, or an edit's: result["stage"] == "edit")."""
    mem = result["memory"]
    edit = result.get("stage") == "edit"
    head = format_head(result)
    lines = [("edit " + head if edit else head) + (f", method {result['method']}" if result.get("method") else "")]
    ck = mem["checkpointing"]
    lines.append(f"predicted peak memory per pass (estimate; {mem['basis']}):")
    for name, row in mem["passes"].items():
        cells = ", ".join(f"{mode} {gib(v) if v is not None else 'not modelled'}" for mode, v in row.items())
        lines.append(f"  {name:<11} {cells}")
    lines += [f"  note: {n}" for n in mem.get("notes") or ()]
    if result.get("target"):
        lines.append(f"checkpointing {ck['mode']} ({ck['reason']})")
    else:
        have = (f"{gib(mem['device_available'])} free of {gib(mem['device_total'])}" if mem["device_total"]
                else "unknown")
        lines.append(f"device memory: {have}; checkpointing {ck['mode']} ({ck['reason']})")
    if result.get("verdict"):
        lines.append(f"verdict: {result['verdict']['text']}")
    lines.append(format_time(result["time"], "edit" if edit else "inversion"))
    return "\n".join(lines)


def plan_inputs(has_ws: bool, dry_run: bool, plan_for: str | None = None, frames: int | None = None,
                size: str | None = None) -> tuple[Target | None, int | None, tuple[int, int] | None]:
    """The CLI's --plan-for / --frames / --size, checked: (Target or None, frames or None, (H, W) or None).
    They need --dry-run; without a workspace the dry run needs --frames and --size."""
    given = [n for n, v in (("--plan-for", plan_for), ("--frames", frames), ("--size", size)) if v is not None]
    if given and not dry_run:
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to a dry run only: "
                         f"add --dry-run")
    if not has_ws and not (dry_run and frames is not None and size is not None):
        raise UsageError("Missing argument 'WS' (a workspace made by `vd mask`; or plan without one: "
                         "--dry-run --frames N --size WxH)")
    from stages.io.video import parse_size

    return (parse_target(plan_for) if plan_for is not None else None, parse_frames(frames),
            parse_size(size) if size is not None else None)


def config_without_workspace(*layers: Any) -> InvertConfig:
    """InvertConfig from presets and flags alone (a dry run for a clip not yet masked)."""
    from stages.common.config import build_config

    return build_config(InvertConfig, *layers)
