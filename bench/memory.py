"""Measured memory model of vd's passes on the full SD1.5 + AnimateDiff v3 architecture (issue 17, item 1).

    python bench/memory.py                                # everything: bf16 (GPU emulation) and fp32, 3 sizes
    python bench/memory.py --dtypes fp32 --sizes 512 --frames 1,2 --passes null_text   # one quick row set
    python bench/memory.py --real-check                   # plus real (non-fake) points against the fake ones
    python bench/memory.py --record                       # append the tables to bench/RESULTS.md
    python bench/memory.py --json a.json ...; bench/memory.py --load a.json b.json   # fit runs made apart

A full run takes about an hour on 2 busy cores (a fake UNet pass costs 3-20 s whatever its size).

Every pass vd runs is executed for real code-wise (vd's own UNet call, attention controller, STDG
recorder, graph cut, edit handlers, VAE calls) but on fake tensors (torch FakeTensorMode): shapes, dtypes,
the autograd graph and every allocation happen, the bytes do not. Two instruments:
- saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks) list the unique storages autograd keeps for
  backward, split into parameters and activations ("held for backward");
- a dispatch mode tracks every live storage by weak reference (allocated when an op returns it, freed when
  its last reference dies), giving the working set after the forward and its peak over the whole pass.
Peaks include the weights of all three models on the device (UNet, VAE and text encoder, as
load_models places them) and the pass's inputs.

dtype "bf16" emulates a GPU run: UNet weights in bf16 under autocast, VAE/text in fp32, and the ops CUDA
autocast runs in float32 and CPU autocast does not (group_norm, layer_norm, softmax) upcast here, sizes
rounded to the CUDA allocator's 512-byte blocks. Not included: the CUDA context, cuBLAS/cuDNN workspaces
and allocator fragmentation (not torch tensors). Attention runs CPU fused SDPA (memory O(tokens), like the
GPU's flash / memory-efficient kernels). dtype "fp32" is the CPU run as it is.

The coefficients printed at the end are the data of stages/models/memory.py (paste them there to refresh).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "RESULTS.md"

import bench as B  # noqa: E402  (the shared harness: commit id)
from stages.models.memory import GRAD_PASSES, LEVELS, PASSES  # noqa: E402  (pure Python, no torch)

GIB = 1 << 30
CHUNKS = {"vae_encode": 4, "vae_decode": 1}  # frames per VAE call in stages.models (vae_encode chunk, decode 1)
SIZES = (256, 512, 768)
FRAMES = (1, 2, 4)
VAE_ENCODE_FRAMES = (1, 2, 4, 8)  # past one chunk of 4, to separate the chunk from the per-clip inputs
T_STEP, T_PREV = 501, 481  # a middle step; the timestep does not change shapes
SRC, TGT = "a red ball rolling on the floor", "a blue ball rolling on the floor"
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to 512 bytes
DEVICE_OF = {"bf16": "cuda", "fp32": "cpu"}  # the run each dtype's rows stand for (predictions table)


# ------------------------------------------------------------------------------------------ instruments

class LiveStorages:
    """TorchDispatchMode tracking live storages: bytes allocated by op outputs until their storage dies.

    Storages are keyed by their Python object (PyTorch keeps one per storage while any reference lives),
    with a weakref callback on it; `peak` is the high-water mark since `reset_peak()`.
    """

    def __init__(self, block: int = 1):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                tracker.add_all(out)
                return out

        self.mode = _Mode()
        self.block = block
        self.live = 0
        self.peak = 0
        self._refs: dict[int, tuple[Any, int]] = {}

    def add(self, t: Any) -> None:
        """Count tensor t's storage (once) until it is freed."""
        st = t.untyped_storage()
        key = id(st)
        if key in self._refs and self._refs[key][0]() is st:
            return
        nbytes = -(-st.nbytes() // self.block) * self.block if st.nbytes() else 0
        self._refs[key] = (weakref.ref(st, functools.partial(self._free, key, nbytes)), nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def add_all(self, obj: Any) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for leaf in tree_leaves(obj):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)

    def _free(self, key: int, nbytes: int, ref: Any) -> None:
        entry = self._refs.get(key)
        if entry is not None and entry[0] is ref:
            del self._refs[key]
            self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live


@contextlib.contextmanager
def saved_storages(param_keys: set[int]) -> Iterator[dict[str, int]]:
    """Bytes of the unique storages autograd saves for backward inside the block: {"activations", "params"}."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef

    seen: dict[int, int] = {}
    out = {"activations": 0, "params": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = StorageWeakRef(st).cdata
        if key not in seen:
            seen[key] = st.nbytes()
            out["params" if key in param_keys else "activations"] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


@contextlib.contextmanager
def cuda_autocast_fp32_ops() -> Iterator[None]:
    """Run the functional ops that CUDA autocast puts in float32 (and CPU autocast does not) in float32.

    Patches torch.nn.functional's functions for the block (a torch-function mode would miss the
    recomputation of checkpointed blocks inside the backward). In vd's UNet these are the GroupNorms and
    LayerNorms; softmax appears only in code that computes it in float32 already.
    """
    import torch
    import torch.nn.functional as F

    names = ("group_norm", "layer_norm", "softmax", "log_softmax")
    low = (torch.bfloat16, torch.float16)
    originals = {n: getattr(F, n) for n in names}

    def upcast(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if torch.is_autocast_enabled("cpu"):
                args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in low else a for a in args)
                kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype in low else v
                          for k, v in kwargs.items()}
            return fn(*args, **kwargs)
        return run

    for n, fn in originals.items():
        setattr(F, n, upcast(fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(F, n, fn)


# ------------------------------------------------------------------------------------------------ model

def find(name: str, *modules: str) -> Any:
    """`name` from the first of `modules` that has it (the stage and models packages are being split into
    smaller modules; the bench works before and after)."""
    import importlib

    for module in modules:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise ImportError(f"none of {', '.join(modules)} has {name}")


def models_api(name: str) -> Any:
    """A name of the models layer: stages.models.ops (after load.py's split), else stages.models.load."""
    return find(name, "stages.models.ops", "stages.models.load")


def weight_counts(models: Any) -> dict[str, int]:
    """Parameter + floating-buffer element counts of the three components."""
    return {name: sum(p.numel() for p in mod.parameters()) + sum(b.numel() for b in mod.buffers()
                                                                 if b.is_floating_point())
            for name, mod in (("unet", models.unet), ("vae", models.vae), ("text", models.text_encoder))}


def build_models(dtype: str, fake_mode: Any | None) -> Any:
    """sd15-random built on the meta device, then given fake (or, without a mode, zero-filled real) CPU
    tensors: the UNet in `dtype`, VAE and text encoder in float32, as load_models places them on a GPU."""
    import torch

    with torch.device("meta"):
        models = models_api("load_models")("sd15-random", device="meta", dtype="fp32")
    cdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for mod, want in ((models.unet, cdtype), (models.vae, torch.float32), (models.text_encoder, torch.float32)):
        if fake_mode is None and mod is not models.unet:
            continue  # the real check runs the UNet only
        _materialise(mod, want, fake_mode)
    models.device = torch.device("cpu")
    models.dtype = cdtype
    return models


def _materialise(module: Any, dtype: Any, fake_mode: Any | None) -> None:
    import torch
    import torch.nn as nn

    done: dict[int, Any] = {}
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    for mod in module.modules():
        for store, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in done:
                    want = dtype if t.is_floating_point() else t.dtype
                    with ctx:
                        new = torch.zeros(t.shape, dtype=want, device="cpu")
                    done[id(t)] = nn.Parameter(new, requires_grad=False) if is_param else new
                store[name] = done[id(t)]


# ----------------------------------------------------------------------------------------------- passes

@dataclass
class Point:
    """One measurement: a pass at a size, frame count, dtype and checkpointing setting (bytes)."""

    dtype: str
    pass_name: str
    checkpointing: str  # off | blocks | layers (stages.models.memory.LEVELS)
    px: int
    frames: int
    weights: int
    saved_activations: int = 0
    saved_params: int = 0
    retained: int = 0  # working set after the forward (before backward) minus the one before the pass
    peak: int = 0  # high-water mark of the working set during the pass, weights included
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class _Probe:
    """A stand-in for invert's PhaseTimer: notes the working set when the STDG backward begins."""

    def __init__(self, tracker: LiveStorages):
        self.tracker = tracker
        self.at: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.at[name] = self.tracker.live
        yield


def _inputs(models: Any, frames: int, px: int) -> dict[str, Any]:
    import torch

    h = w = px // 8
    dim = models.text_dim
    return {"z": torch.zeros(1, frames, 4, h, w), "c_src": torch.zeros(frames, 77, dim),
            "neg": torch.zeros(1, 77, dim), "mask": torch.zeros(frames, px, px, dtype=torch.bool),
            "latents": torch.zeros(51, frames, 4, h, w)}  # the DDIM trajectory invert holds (50 steps)


def run_pass(name: str, models: Any, frames: int, px: int, tracker: LiveStorages, param_keys: set[int],
             checkpointing: str = "off") -> dict[str, int]:
    """Run one pass as vd runs it; returns saved/retained bytes (the caller reads the peak)."""
    import torch

    from stages.method.control.controller import AttentionController, install

    unet_eps = models_api("unet_eps")
    result = {"saved_activations": 0, "saved_params": 0, "retained": 0}
    if name in ("ddim", "null_text"):  # vd runs every UNet call through its controller (no handlers here)
        install(models.unet, AttentionController())
    # the UNet passes run with the arrays of their frames alive (trajectory, masks, embeddings: the clip state
    # of one window); the VAE passes with their input only (stages.models.memory adds the clip state of the
    # frames outside the window, and of the whole clip around the decode)
    x = _inputs(models, frames, px) if name not in ("vae_encode", "vae_decode") else \
        {"z": torch.zeros(1, frames, 4, px // 8, px // 8)}
    start = tracker.live
    if name == "ddim":
        with torch.no_grad():
            unet_eps(models, x["z"], T_STEP, x["c_src"])
    elif name == "null_text":
        _null_text(models, x, tracker, param_keys, checkpointing, result, start)
    elif name == "stdg":
        _stdg(models, x, tracker, param_keys, checkpointing, result, start)
    elif name == "edit":
        _edit(models, x, frames, px)
    elif name == "vae_encode":
        _vae_encode(models, frames, px)
    elif name == "vae_decode":
        _vae_decode(models, x["z"][0])
    else:
        raise ValueError(f"unknown pass {name!r}")
    return result


def _null_text(models: Any, x: dict[str, Any], tracker: LiveStorages, param_keys: set[int], checkpointing: str,
               result: dict[str, int], start: int) -> None:
    """One inner null-text iteration as invert's _step runs it: eps_u with phi requiring grad, the DDIM
    step with CFG and STDG guidance, MSE to the trajectory's next latent, backward into phi (UNet frozen)."""
    import torch
    import torch.nn.functional as Fn

    from stages.invert.checkpointing import checkpointed
    from stages.method import ddim

    unet_eps = models_api("unet_eps")

    frames = x["z"].shape[1]
    z_t, target, G = x["latents"][-1][None], x["latents"][-2][None], torch.zeros_like(x["z"])
    with torch.no_grad():
        eps_c = unet_eps(models, z_t, T_STEP, x["c_src"])
    phi = x["neg"].repeat(frames, 1, 1).requires_grad_(True)
    adam_state = [torch.zeros_like(phi), torch.zeros_like(phi)]  # exp_avg, exp_avg_sq (Adam's step is skipped)
    with checkpointed(models.unet, None, checkpointing), torch.enable_grad():
        with saved_storages(param_keys) as saved:
            eps_u = unet_eps(models, z_t, T_STEP, phi)
            z_rec = ddim.ddim_step(z_t, ddim.cfg(eps_u, eps_c, 7.5), T_STEP, T_PREV, guidance=G)
            loss = Fn.mse_loss(z_rec, target)
        result["retained"] = tracker.live - start
        loss.backward()
    result["saved_activations"], result["saved_params"] = saved["activations"], saved["params"]
    del adam_state


def _stdg(models: Any, x: dict[str, Any], tracker: LiveStorages, param_keys: set[int], checkpointing: str,
          result: dict[str, int], start: int) -> None:
    """invert's STDG step: truncated GT forward to compact targets, then STDG.gradient (grad forward with the
    recorders and the graph cut after up_blocks.2, one backward to z). The float() of the losses at its very
    end cannot run on fake tensors; the backward has run by then (checked by the backward count)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from stages.invert.checkpointing import checkpointed
    from stages.method.control.controller import AttentionController, install
    from stages.method.guidance import RegionMasks, needs_terms

    STDG = find("STDG", "stages.invert.stdg", "stages.invert.run")
    Passes = find("Passes", "stages.invert.passes", "stages.invert.run")
    coef = find("DEFAULT_STDG", "stages.invert.config", "stages.invert.run")["foreground"]
    h, w = x["z"].shape[-2:]
    controller = install(models.unet, AttentionController())
    probe = _Probe(tracker)
    passes = Passes(models, timer=probe)
    stdg = STDG(passes, controller, RegionMasks(x["mask"], (h, w)), x["c_src"], coef)
    try:
        targets = stdg.targets(x["latents"][-2][None], T_STEP, needs_terms(coef))
        with checkpointed(models.unet, controller, checkpointing), saved_storages(param_keys) as saved:
            try:
                stdg.gradient(x["latents"][-1][None], T_STEP, targets)
            except DataDependentOutputException:
                pass
        if passes.backwards != 1:
            raise RuntimeError("the STDG backward did not run")
    finally:
        controller.clear()
    result["saved_activations"], result["saved_params"] = saved["activations"], saved["params"]
    result["retained"] = probe.at["stdg_backward"] - start


def _edit(models: Any, x: dict[str, Any], frames: int, px: int) -> None:
    """One 4-slot edit step with its heaviest handlers on at once: SA-II (masked source + edit keys) in
    up_blocks.1-3, P2P cross-attention maps in every cross layer, local-blend recording."""
    import torch

    from stages.method.control.controller import AttentionController, install
    from stages.method.control.editing import BLEND_BLOCKS, SA2_BLOCKS, EditAttention, KeyMasks, LocalBlend
    from stages.method.prompts import cross_plan, word_positions

    unet_eps = models_api("unet_eps")

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    h, w = px // 8, px // 8
    # the plan's few real numbers: EditAttention reads the alphas' values once, when it installs its handlers
    with unset_fake_temporarily():
        plan = cross_plan(models.tokenizer, SRC, TGT)
    blend = LocalBlend(word_positions(models.tokenizer, SRC, "ball"), word_positions(models.tokenizer, TGT, "ball"),
                       (h, w))
    controller = install(models.unet, AttentionController())
    control = EditAttention(sa1=False, sa2=True, cross=True, sa1_steps=0, cross_steps=1 << 30,
                            mapper=plan.mapper, alphas=plan.alphas, equalizer=plan.equalizer,
                            key_masks=KeyMasks(x["mask"], (h, w)), blend=blend, sa1_layers=(),
                            sa2_blocks=SA2_BLOCKS, blend_blocks=BLEND_BLOCKS)
    with unset_fake_temporarily():
        control.install(controller)
    controller.step = 1
    e, ref = x["latents"][-1], x["latents"][-2]
    emb = torch.cat([x["neg"].expand(frames, -1, -1), x["c_src"], x["neg"].expand(frames, -1, -1), x["c_src"]])
    try:
        with torch.no_grad():
            unet_eps(models, torch.stack([e, e, ref, ref]), T_STEP, emb)
    finally:
        controller.clear()
    if not control.usage.get("sa2") or not control.usage.get("p2p"):
        raise RuntimeError(f"the edit handlers did not run: {dict(control.usage)}")


def _vae_encode(models: Any, frames: int, px: int) -> None:
    """stages.models' vae_encode itself (chunks of 4 frames, each copied to the device on its own, one
    posterior sample)."""
    import numpy as np

    models_api("vae_encode")(models, np.zeros((frames, px, px, 3), np.uint8))


def _vae_decode(models: Any, latents: Any) -> None:
    """vae_decode's loop (one frame per VAE call) without its .numpy() (fake tensors have no data)."""
    import torch

    out = []
    with torch.no_grad():
        for z in latents:
            img = models.vae.decode(z[None].float() / models.vae.config.scaling_factor).sample
            img = (img / 2 + 0.5).clamp(0, 1)
            out.append((img[0].permute(1, 2, 0) * 255).round().to(torch.uint8))


def _track_weights(tracker: LiveStorages, *modules: Any) -> tuple[int, set[int]]:
    """Count the modules' parameters and buffers as live; (their bytes, the UNet's parameter storage keys)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    for mod in modules:
        for t in [*mod.parameters(), *mod.buffers()]:
            tracker.add(t)
    return tracker.live, {StorageWeakRef(p.untyped_storage()).cdata for p in modules[0].parameters()}


def measure(dtype: str, sizes: tuple[int, ...], frames: tuple[int, ...], passes: tuple[str, ...],
            checkpointing: tuple[str, ...], log: Callable[[str], None] = print) -> list[Point]:
    """All requested points for one dtype, in one fake mode (vae_encode adds 8 frames to the default 1, 2, 4)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    models = build_models(dtype, fake)
    tracker = LiveStorages(CUDA_BLOCK if dtype == "bf16" else 1)
    weights, param_keys = _track_weights(tracker, models.unet, models.vae, models.text_encoder)
    points = []
    for name in passes:
        counts = VAE_ENCODE_FRAMES if name == "vae_encode" and tuple(frames) == FRAMES else frames
        for ckpt in checkpointing:
            if ckpt != "off" and name not in GRAD_PASSES:
                continue
            for px in sizes:
                for f in counts:
                    gc.collect()
                    tracker.reset_peak()
                    t0 = time.perf_counter()
                    emulate = cuda_autocast_fp32_ops() if dtype == "bf16" else contextlib.nullcontext()
                    with fake, tracker.mode, emulate:
                        res = run_pass(name, models, f, px, tracker, param_keys, ckpt)
                    gc.collect()
                    p = Point(dtype, name, ckpt, px, f, weights, peak=tracker.peak,
                              seconds=time.perf_counter() - t0, **res)
                    if tracker.live - weights > 1 << 20:  # a pass must free what it allocated
                        p.extra["leaked"] = tracker.live - weights
                    points.append(p)
                    log(_row(p))
    return points


REAL_CHECKS = (("null_text", "off"), ("null_text", "layers"), ("stdg", "layers"))  # 256 px, 1 frame, fp32


def real_point(px: int, frames: int, pass_name: str = "null_text", level: str = "off") -> dict[str, Any]:
    """A grad pass at a small size on real CPU tensors (float32, zero weights): the fake check."""
    import torch

    torch.set_num_threads(1)
    models = build_models("fp32", None)
    tracker = LiveStorages()
    weights, param_keys = _track_weights(tracker, models.unet)
    gc.collect()
    tracker.reset_peak()
    t0 = time.perf_counter()
    with tracker.mode:
        res = run_pass(pass_name, models, frames, px, tracker, param_keys, level)
    return {**res, "pass_name": pass_name, "checkpointing": level, "px": px, "frames": frames, "peak": tracker.peak,
            "weights": weights, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------- fit

def fit(points: list[Point], weights: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Coefficients per dtype and pass ("<pass>+<level>" with checkpointing), the format of
    stages.models.memory.COEFFICIENTS.

    At each size, least squares of peak - weights over the frame counts: const + per_frame * F for the UNet
    passes, const + per_frame * min(F, 4) + per_clip_frame * F for vae_encode (chunks of 4 frames), const +
    per_clip_frame * F for vae_decode (one frame per call). Across sizes each term is a power of the latent
    token count, fitted in log space and anchored at 512 px.
    """
    import numpy as np

    groups: dict[tuple[str, str, str], list[Point]] = {}
    for p in points:
        groups.setdefault((p.dtype, p.pass_name, p.checkpointing), []).append(p)
    out: dict[str, dict[str, Any]] = {}
    for (dtype, name, ckpt), pts in sorted(groups.items()):
        chunk = CHUNKS.get(name)
        per_size: dict[int, dict[str, float]] = {}
        for px in sorted({p.px for p in pts}):
            rows = [p for p in pts if p.px == px]
            fr = np.array([p.frames for p in rows], float)
            y = np.array([p.peak - weights[dtype] for p in rows], float)
            labels = ["const", "per_frame"] if chunk is None else ["const", "per_clip_frame"] if chunk == 1 \
                else ["const", "per_frame", "per_clip_frame"]
            cols = {"const": np.ones_like(fr), "per_frame": np.minimum(fr, chunk or fr.max()), "per_clip_frame": fr}
            coef, *_ = np.linalg.lstsq(np.stack([cols[k] for k in labels], 1), y, rcond=None)
            per_size[px] = dict(zip(labels, (float(v) for v in coef)))
        entry = _token_fit(per_size)
        if chunk is not None:
            entry["chunk"] = chunk
        out.setdefault(dtype, {})[name if ckpt == "off" else f"{name}+{ckpt}"] = entry
    return out


def _token_fit(per_size: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Each term as value_512 * (tokens / 4096) ** exp (exp 1 when a term changes sign across sizes)."""
    import numpy as np

    ref = 512 if 512 in per_size else sorted(per_size)[len(per_size) // 2]
    r = {px: (px // 8) ** 2 / 4096 for px in per_size}
    entry: dict[str, Any] = {}
    for label in per_size[ref]:
        vals = {px: v[label] for px, v in per_size.items()}
        expo = 1.0
        if len(vals) >= 2 and (all(v > 0 for v in vals.values()) or all(v < 0 for v in vals.values())):
            xs = np.log([r[px] / r[ref] for px in vals])
            ys = np.log([vals[px] / vals[ref] for px in vals])
            expo = float(np.dot(xs, ys) / np.dot(xs, xs))
        entry[label] = int(round(vals[ref] / r[ref] ** expo))
        entry[f"{label}_exp"] = round(expo, 4) + 0.0  # + 0.0: no "-0.0" in the printed table
    return entry


# ----------------------------------------------------------------------------------------------- report

def _gib(n: float) -> str:
    return f"{n / GIB:.3f}"


def _row(p: Point) -> str:
    ck = p.checkpointing
    return (f"| {p.dtype} | {p.pass_name} | {ck} | {p.px} | {p.frames} | {_gib(p.saved_activations)} | "
            f"{_gib(p.saved_params)} | {_gib(p.retained)} | {_gib(p.peak)} | {_gib(p.peak - p.weights)} | "
            f"{p.seconds:.1f} |")


TABLE_HEAD = ("| dtype | pass | checkpointing | px | frames | saved activations GiB | saved params GiB | "
              "retained after forward GiB | peak GiB | peak - weights GiB | fake s |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")


def summary_table(points: list[Point]) -> list[str]:
    """Markdown: one row per dtype, pass, checkpointing and size; peaks minus weights and the activations
    held for backward at each frame count, in GiB."""
    counts = sorted({p.frames for p in points})
    rows: dict[tuple[str, str, str, int], dict[int, Point]] = {}
    for p in points:
        rows.setdefault((p.dtype, p.pass_name, p.checkpointing, p.px), {})[p.frames] = p
    head = ("| dtype | pass | checkpointing | px | " + " | ".join(f"peak-w {f}f" for f in counts) + " | "
            + " | ".join(f"held {f}f" for f in FRAMES) + " | held params |")
    lines = [head, "|" + "---|" * (5 + len(counts) + len(FRAMES))]
    order = {name: k for k, name in enumerate(PASSES)}
    for (dtype, name, ckpt, px), by in sorted(rows.items(), key=lambda kv: (kv[0][0], order[kv[0][1]],
                                                                         LEVELS.index(kv[0][2]),
                                                                         kv[0][3])):
        peaks = [_gib(by[f].peak - by[f].weights) if f in by else "" for f in counts]
        grad = name in GRAD_PASSES
        held = [_gib(by[f].saved_activations) if f in by and grad else "" for f in FRAMES]
        params = _gib(max(p.saved_params for p in by.values())) if grad else ""
        lines.append(f"| {dtype} | {name} | {ckpt} | {px} | " + " | ".join(peaks) + " | "
                     + " | ".join(held) + f" | {params} |")
    return lines


def predictions(coefficients: dict[str, Any], elements: dict[str, int], frames: int = 16) -> list[str]:
    """Markdown rows: predicted peak per pass at `frames` frames for 256/512/768 px, per dtype: bf16 on a GPU
    (the VAE and text encoder in host memory during the UNet passes), fp32 on the CPU (all three resident)."""
    from stages.models import memory

    lines = ["| dtype | pass | checkpointing | 256 px GiB | 512 px GiB | 768 px GiB |", "|---|---|---|---|---|---|"]
    for dtype, table in coefficients.items():
        for key in table:
            name, _, ckpt = key.partition("+")
            ckpt = ckpt or "off"
            cells = [_gib(memory.predict_peak(name, frames, px, px, dtype, ckpt, device=DEVICE_OF[dtype],
                                              table=coefficients, weights=elements)) for px in SIZES]
            lines.append(f"| {dtype} | {name} | {ckpt} | " + " | ".join(cells) + " |")
    return lines


def fit_errors(points: list[Point], coefficients: dict[str, Any], elements: dict[str, int]) -> list[str]:
    """Markdown rows: the largest relative error of predict_peak against the measured peaks, per pass."""
    from stages.models import memory

    worst: dict[tuple[str, str, str], tuple[float, Point]] = {}
    for p in points:
        # as measured: all three models resident (the weights "cpu" counts)
        pred = memory.predict_peak(p.pass_name, p.frames, p.px, p.px, p.dtype, p.checkpointing, device="cpu",
                                   table=coefficients, weights=elements)
        err = (pred - p.peak) / p.peak
        key = (p.dtype, p.pass_name, p.checkpointing)
        if key not in worst or abs(err) > abs(worst[key][0]):
            worst[key] = (err, p)
    lines = ["| dtype | pass | checkpointing | largest error of the fit | at |", "|---|---|---|---|---|"]
    for (dtype, name, ckpt), (err, p) in sorted(worst.items()):
        lines.append(f"| {dtype} | {name} | {ckpt} | {100 * err:+.2f}% | "
                     f"{p.px} px, {p.frames} frame(s) |")
    return lines


def coefficient_block(coefficients: dict[str, Any], weights: dict[str, int]) -> str:
    """The data of stages/models/memory.py, in its own format."""
    lines = ["WEIGHT_ELEMENTS = " + json.dumps(weights), "COEFFICIENTS = {"]
    for dtype, table in coefficients.items():
        lines.append(f'    "{dtype}": {{')
        for key, entry in table.items():
            lines.append(f'        "{key}": {json.dumps(entry)},')
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp32", help="bf16 (GPU emulation) and/or fp32")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--frames", default=",".join(map(str, FRAMES)), help="vae_encode adds 8 to the default 1,2,4")
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--levels", default="off,blocks,layers", help="checkpointing levels of the grad passes")
    ap.add_argument("--real-check", action="store_true", help="also run real points (256 px, 1 frame, fp32: "
                                                               "null_text off and layers, stdg layers)")
    ap.add_argument("--json", help="write the points (and the real check) to this file")
    ap.add_argument("--load", nargs="*", default=[], help="points from earlier --json files (no new run "
                                                          "unless --dtypes/--passes are given too)")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--real-point", help=argparse.SUPPRESS)  # internal: "PX,FRAMES,PASS,LEVEL", in a subprocess
    args = ap.parse_args(argv)
    if args.real_point:
        px, f, name, level = args.real_point.split(",")
        print(json.dumps(real_point(int(px), int(f), name, level)))
        return 0
    t0 = time.perf_counter()
    points: list[Point] = []
    real: list[dict[str, Any]] = []
    for path in args.load:
        data = json.loads(Path(path).read_text())
        points += [Point(**{**p, "checkpointing": _level(p["checkpointing"])}) for p in data["points"]]
        found = data.get("real") or []
        real += found if isinstance(found, list) else [found]
    explicit = any(a.startswith(("--dtypes", "--passes")) for a in (argv if argv is not None else sys.argv[1:]))
    if not args.load or explicit:
        dtypes = tuple(d for d in args.dtypes.split(",") if d)
        passes = tuple(p for p in args.passes.split(",") if p)
        unknown = [p for p in passes if p not in PASSES] + [d for d in dtypes if d not in ("bf16", "fp32")] \
            + [v for v in args.levels.split(",") if v and v not in LEVELS]
        if unknown:
            ap.error(f"unknown pass or dtype: {', '.join(unknown)}")
        sizes = tuple(int(v) for v in args.sizes.split(","))
        frames = tuple(int(v) for v in args.frames.split(","))
        ckpts = tuple(v for v in args.levels.split(",") if v)
        print(TABLE_HEAD)
        for dtype in dtypes:
            points += measure(dtype, sizes, frames, passes, ckpts)
    if args.real_check:
        real += [_run_real(256, 1, name, level, points) for name, level in REAL_CHECKS]
    if args.json:
        Path(args.json).write_text(json.dumps({"points": [asdict(p) for p in points], "real": real}, indent=1))
    weights = {p.dtype: p.weights for p in points}
    elements = _weight_elements()
    coefficients = fit(points, weights)
    preds = predictions(coefficients, elements)
    errors = fit_errors(points, coefficients, elements)
    print("\nSummary (GiB; peak-w: peak minus the weights, held: activations saved for backward):\n"
          + "\n".join(summary_table(points)))
    print("\nFit against the measured peaks:\n" + "\n".join(errors))
    print("\nPredicted peak at 16 frames (weights + activations + workspace):\n" + "\n".join(preds))
    block = coefficient_block(coefficients, elements)
    print("\nCoefficients (stages/models/memory.py):\n" + block)
    if args.record:
        _record(points, preds + ["", *errors], block, real, time.perf_counter() - t0)
    return 0


def _level(value: Any) -> str:
    """A point's checkpointing level (files written before `layers` hold a bool: True was blocks)."""
    return value if isinstance(value, str) else "blocks" if value else "off"


def _weight_elements() -> dict[str, int]:
    import torch

    with torch.device("meta"):
        models = models_api("load_models")("sd15-random", device="meta", dtype="fp32")
    return weight_counts(models)


def _run_real(px: int, frames: int, pass_name: str, level: str, points: list[Point]) -> dict[str, Any]:
    """A real point in a fresh process (its 5 GB of float32 UNet weights go away with it), printed next to the
    fake one at the same point when there is one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--real-point", f"{px},{frames},{pass_name},{level}"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"real point failed: {proc.stderr.strip().splitlines()[-1:]}")
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    fake = next((p for p in points if (p.dtype, p.pass_name, p.checkpointing, p.px, p.frames)
                 == ("fp32", pass_name, level, px, frames)), None)
    print(f"\nReal check, {pass_name} {level} fp32 {px} px {frames} frame(s), real CPU tensors: saved activations "
          f"{_gib(real['saved_activations'])} GiB, saved params {_gib(real['saved_params'])} GiB, peak - UNet "
          f"weights {_gib(real['peak'] - real['weights'])} GiB ({real['seconds']:.0f} s)")
    if fake is not None:
        real["fake"] = asdict(fake)
        print(f"Fake, same point: saved activations {_gib(fake.saved_activations)} GiB, saved params "
              f"{_gib(fake.saved_params)} GiB, peak - all weights {_gib(fake.peak - fake.weights)} GiB")
    return real


def _record(points: list[Point], preds: list[str], block: str, real: list[dict[str, Any]], seconds: float) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n### {stamp} | CPU, fake-tensor measurement ({platform.machine()} x{os.cpu_count()}) | commit "
             f"{B.commit_id()} | bench/memory.py ({seconds:.0f} s)\n", *summary_table(points), "",
             "Predicted peak at 16 frames:", "", *preds, "", "```", block, "```"]
    for point in real:
        shown = {k: v for k, v in point.items() if k != "fake"}
        fake = point.get("fake")
        versus = f"; fake peak - all weights {fake['peak'] - fake['weights']}" if fake else ""
        lines.append(f"\nReal check ({point.get('pass_name', 'null_text')} {point.get('checkpointing', 'off')}, fp32, "
                     f"real CPU tensors): {json.dumps(shown)}{versus}")
    with RESULTS.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
