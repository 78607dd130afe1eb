"""Predicted peak device memory of vd's passes on SD1.5 + AnimateDiff v3, from measured coefficients.

Pure Python, no torch: `--checkpointing auto`, the out-of-memory message and `--dry-run` ask it before
anything is loaded. The coefficients are measured by bench/memory.py (fake tensors: every allocation of
the real code, without the bytes; bench/RESULTS.md has the table); rerun it to refresh them and paste
its printed block below.

Model, per pass and dtype (and checkpointing for the passes that backpropagate):
    peak = weights + const * r**const_exp + per_frame * r**per_frame_exp * min(F, chunk)
           + per_clip_frame * r**per_clip_frame_exp * F
with r = latent tokens / 4096 (4096 = 64 x 64, a 512x512 clip) and F the frames of one call (the
window for the UNet passes, the clip for the VAE). The weights are those on the device during the pass: on a
GPU the UNet always and the VAE during the VAE passes (load_models keeps the VAE and text encoder in host
memory between their calls); on the CPU all three. "bf16" is a GPU run (UNet in bf16 under autocast, VAE
and text encoder in float32, as load_models places them); fp16 has the same sizes. The checkpointing levels
(LEVELS): off, blocks (each UNet block recomputed in the backward), layers (each layer inside the blocks).
Not included: the CUDA
context and the cuBLAS/cuDNN workspaces (outside torch's allocator statistics): planning for a GPU
(`--plan-for`) subtracts CUDA_CONTEXT_ALLOWANCE from the card's memory for them.

"bf16-cpu" (CPU_AUTOCAST) is a CPU run with --dtype bf16/fp16: load_models keeps the UNet in float32 on the
CPU and CPU autocast computes in bf16. Predicted as the bf16 rows' activations (an upper bound: CPU
autocast keeps group_norm/layer_norm in the input dtype, CUDA autocast upcasts them) + float32 weights + in
the grad passes a bf16 copy of the UNet weights (autocast's casts, which the backward keeps); two small real
CPU points of the null-text pass came out 2.6% and 3.8% below it (bench/RESULTS.md, 2026-12-06).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

PASSES = ("ddim", "stdg", "null_text", "edit", "vae_encode", "vae_decode")
GRAD_PASSES = ("stdg", "null_text")
STAGE_PASSES = {"invert": ("vae_encode", "ddim", "stdg", "null_text", "vae_decode"), "edit": ("edit", "vae_decode")}
REF_TOKENS = 64 * 64
GIB = 1 << 30
_DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "bf16",
           "float16": "bf16", "half": "bf16", "bf16-cpu": "bf16-cpu"}
CPU_AUTOCAST = "bf16-cpu"  # a CPU run under bf16/fp16 autocast: float32 UNet weights, bf16 activations
LEVELS = ("off", "blocks", "layers")  # checkpointing levels of the grad passes, cheapest in time first
# device memory a CUDA process uses outside torch's allocator (the CUDA context with its kernels, cuBLAS/cuDNN
# workspaces): an assumption (typically 0.3-0.6 GiB), not measured here; bench/gpu.py records the real figure
CUDA_CONTEXT_ALLOWANCE = GIB // 2
DEFAULT_STEPS = 50
TEXT_TOKENS, TEXT_DIM = 77, 768  # SD1.5's CLIP text embedding per frame

# --- measured by bench/memory.py (CPU, fake-tensor measurement; bench/RESULTS.md: the grad passes' and the VAE
# --- passes' rows 2026-12-06, ddim and edit 2026-12-03); refresh by pasting the block it prints
WEIGHT_ELEMENTS = {"unet": 1277221764, "vae": 83653863, "text": 123060480}
COEFFICIENTS: dict[str, dict[str, dict[str, Any]]] = {
    "bf16": {
        "ddim": {"const": 238080, "const_exp": 0.0, "per_frame": 74688000, "per_frame_exp": 0.9943},
        "edit": {"const": 241920, "const_exp": -0.0009, "per_frame": 288247991, "per_frame_exp": 0.9926},
        "null_text": {"const": 1385472, "const_exp": -0.0039, "per_frame": 1677070555, "per_frame_exp": 0.9948},
        "null_text+blocks": {"const": 331776, "const_exp": 0.0, "per_frame": 655817216, "per_frame_exp": 0.9966},
        "null_text+layers": {"const": 249856, "const_exp": 0.0, "per_frame": 206600704, "per_frame_exp": 0.9918},
        "stdg": {"const": -534528, "const_exp": 1.0, "per_frame": 1182828178, "per_frame_exp": 0.9942},
        "stdg+blocks": {"const": 299520, "const_exp": -0.0004, "per_frame": 392425984, "per_frame_exp": 0.9975},
        "stdg+layers": {"const": 251904, "const_exp": -0.0005, "per_frame": 131625472, "per_frame_exp": 0.9952},
        "vae_decode": {"const": 804651008, "const_exp": 1.0, "per_clip_frame": 1750747, "per_clip_frame_exp": 1.0, "chunk": 1},
        "vae_encode": {"const": 0, "const_exp": 1.024, "per_frame": 674103296, "per_frame_exp": 1.0, "per_clip_frame": 196608, "per_clip_frame_exp": 1.0, "chunk": 4},
    },
    "fp32": {
        "ddim": {"const": 237832, "const_exp": 0.0, "per_frame": 140226560, "per_frame_exp": 0.9969},
        "edit": {"const": 242904, "const_exp": 0.0, "per_frame": 550402304, "per_frame_exp": 0.9961},
        "null_text": {"const": 236560, "const_exp": 0.0, "per_frame": 2678898432, "per_frame_exp": 0.9943},
        "null_text+blocks": {"const": 236552, "const_exp": 0.0, "per_frame": 1037211136, "per_frame_exp": 0.9973},
        "null_text+layers": {"const": 236552, "const_exp": 0.0, "per_frame": 381748480, "per_frame_exp": 0.9956},
        "stdg": {"const": -990968, "const_exp": 1.7235, "per_frame": 1862558549, "per_frame_exp": 0.9929},
        "stdg+blocks": {"const": 236568, "const_exp": 0.0, "per_frame": 646875136, "per_frame_exp": 0.9979},
        "stdg+layers": {"const": 237832, "const_exp": 0.0, "per_frame": 245506560, "per_frame_exp": 0.9976},
        "vae_decode": {"const": 804651008, "const_exp": 1.0, "per_clip_frame": 1750747, "per_clip_frame_exp": 1.0, "chunk": 1},
        "vae_encode": {"const": 0, "const_exp": 1.024, "per_frame": 674103296, "per_frame_exp": 1.0, "per_clip_frame": 196608, "per_clip_frame_exp": 1.0, "chunk": 4},
    },
}
# --- end of measured data ---


def canonical_dtype(dtype: str) -> str:
    """'fp32' or 'bf16' (the table a dtype name reads: fp16 has bf16's sizes)."""
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use fp32, bf16 or fp16)")
    return _DTYPES[name]


def weight_bytes(dtype: str, weights: Mapping[str, int] | None = None, pass_name: str | None = None,
                 device: str = "cuda") -> int:
    """Bytes of the model weights on the device during `pass_name`: the UNet in `dtype` (float32 on the CPU)
    and the VAE and text encoder in float32, which on a GPU are there only for the VAE passes (they wait in
    host memory otherwise: stages.models.ops.on_device). pass_name None: all three."""
    elements = WEIGHT_ELEMENTS if weights is None else weights
    dt = canonical_dtype(dtype)
    unet_bytes = 4 if dt in ("fp32", CPU_AUTOCAST) else 2
    on_gpu = str(device).startswith("cuda") and dt != CPU_AUTOCAST
    if pass_name is None or not on_gpu:
        others = int(elements["vae"]) + int(elements["text"])
    else:
        others = int(elements["vae"]) if pass_name.startswith("vae") else 0
    return int(elements["unet"]) * unet_bytes + others * 4


def check_level(level: str) -> str:
    """A checkpointing level of LEVELS, or ValueError naming them."""
    if level not in LEVELS:
        raise ValueError(f"unknown checkpointing level {level!r}; choose from {', '.join(LEVELS)}")
    return level


def predict_peak(pass_name: str, frames: int, height: int, width: int, dtype: str = "bf16", level: str = "off",
                 *, device: str = "cuda", table: Mapping[str, Any] | None = None,
                 weights: Mapping[str, int] | None = None) -> int:
    """Predicted peak bytes of one pass (weights + activations + workspace) for `frames` frames per call of
    height x width pixels on `device` ("cuda..." or "cpu": which weights are there, see weight_bytes);
    `level` (LEVELS) recomputes UNet blocks or layers in the backward (grad passes only; others ignore it).

    table / weights replace the measured COEFFICIENTS / WEIGHT_ELEMENTS (tests, a fresh bench run).
    """
    if pass_name not in PASSES:
        raise ValueError(f"unknown pass {pass_name!r}; choose from {', '.join(PASSES)}")
    check_level(level)
    if int(frames) < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if int(height) < 8 or int(width) < 8:
        raise ValueError(f"height and width must be at least 8 pixels, got {height}x{width}")
    dt = canonical_dtype(dtype)
    rows = (COEFFICIENTS if table is None else table).get("bf16" if dt == CPU_AUTOCAST else dt) or {}
    key = f"{pass_name}+{level}" if level != "off" and pass_name in GRAD_PASSES else pass_name
    if key not in rows:
        raise ValueError(f"no measured coefficients for {key} in {dt}; run bench/memory.py")
    c = rows[key]
    r = math.ceil(int(height) / 8) * math.ceil(int(width) / 8) / REF_TOKENS
    chunk = c.get("chunk")
    n = int(frames) if chunk is None else min(int(frames), int(chunk))
    act = sum(c.get(term, 0) * r ** c.get(f"{term}_exp", 1.0) * times
              for term, times in (("const", 1), ("per_frame", n), ("per_clip_frame", int(frames))))
    copies = 0
    if dt == CPU_AUTOCAST and pass_name in GRAD_PASSES:  # bf16 casts of the float32 UNet weights, kept for backward
        copies = int((WEIGHT_ELEMENTS if weights is None else weights)["unet"]) * 2
    return weight_bytes(dt, weights, pass_name, device) + copies + max(int(round(act)), 0)


def clip_state_bytes(frames: int, height: int, width: int, steps: int = DEFAULT_STEPS) -> int:
    """Bytes a stage keeps on the device for each of `frames` frames besides one pass's activations, counted
    from the arrays (the ones bench/memory.py gives a UNet pass for its own frames): the DDIM trajectory
    (steps + 1 latents) and the current latent in float32, a text or null embedding (77 x 768 float32) and
    the mask (a byte per pixel)."""
    tokens = math.ceil(int(height) / 8) * math.ceil(int(width) / 8)
    per_frame = (int(steps) + 2) * 4 * tokens * 4 + TEXT_TOKENS * TEXT_DIM * 4 + int(height) * int(width)
    return int(frames) * per_frame


def predict_passes(passes: tuple[str, ...] | list[str], frames: int, height: int, width: int, dtype: str = "bf16",
                   window: int | None = None, device: str = "cuda", steps: int = DEFAULT_STEPS
                   ) -> dict[str, dict[str, int]]:
    """{pass: {level: bytes}} for `passes` of a stage on a clip of `frames` frames: UNet passes see
    min(frames, window) frames plus the clip state (clip_state_bytes) of the frames outside the window, the
    VAE encode the whole clip (it runs before that state exists), the VAE decode the whole clip and its state.
    A grad pass has a figure per checkpointing level (LEVELS), the others only "off". Raises ValueError like
    predict_peak."""
    per_call = min(int(frames), int(window)) if window else int(frames)
    outside = {"vae_encode": 0, "vae_decode": int(frames)}
    out: dict[str, dict[str, int]] = {}
    for name in passes:
        n = int(frames) if name.startswith("vae") else per_call
        state = clip_state_bytes(outside.get(name, int(frames) - per_call), height, width, steps)
        levels = LEVELS if name in GRAD_PASSES else LEVELS[:1]
        out[name] = {level: predict_peak(name, n, height, width, dtype, level, device=device) + state
                     for level in levels}
    return out


def predict_stage_peak(stage: str, frames: int, height: int, width: int, dtype: str = "bf16", level: str = "off",
                       window: int | None = None, device: str = "cuda", steps: int = DEFAULT_STEPS) -> int:
    """The largest pass peak of a stage ("invert" or "edit") at checkpointing `level` (predict_passes)."""
    if stage not in STAGE_PASSES:
        raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGE_PASSES)}")
    check_level(level)
    rows = predict_passes(STAGE_PASSES[stage], frames, height, width, dtype, window, device, steps)
    return max(row.get(level, row["off"]) for row in rows.values())


def peak_by_level(rows: Mapping[str, Mapping[str, int | None]]) -> dict[str, int | None]:
    """The stage peak per checkpointing level from predict_passes' rows (a pass without a figure for a level
    runs as "off" there); None where a pass has no prediction."""
    out: dict[str, int | None] = {}
    for level in LEVELS:
        values = [row.get(level, row.get("off")) for row in rows.values()]
        out[level] = max(values) if values and all(v is not None for v in values) else None  # type: ignore[type-var]
    return out


def largest_window(passes: tuple[str, ...] | list[str], height: int, width: int, usable: int, dtype: str = "bf16",
                   level: str = "off", max_frames: int = 32, device: str = "cuda") -> int:
    """The most frames per UNet call (one window, the clip that long) whose stage peak at `level` stays within
    `usable` bytes; 0 when not even one frame fits."""
    best = 0
    for frames in range(1, int(max_frames) + 1):  # peaks grow with frames (per-frame terms >= 0)
        rows = predict_passes(passes, frames, height, width, dtype, device=device)
        if max(row.get(level, row["off"]) for row in rows.values()) > usable:
            break
        best = frames
    return best
