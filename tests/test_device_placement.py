"""Device placement of the stages' GPU work, checked on any machine (issue 30).

The tiny model is moved onto *fake* CUDA tensors (torch FakeTensorMode: shapes, dtypes and devices without
data or a GPU), the UNet in bf16 as load_models places it on a GPU, with CUDA autocast switched on for them,
and the stages' passes run at the method level: the VAE, DDIM inversion, STDG targets and gradient, the
null-text Adam step, direct and negative-prompt inversion, windows with checkpointed blocks, every edit kind
(edit_latents), SAM2 tracking. A CPU tensor mixed into CUDA work raises at that op, as on a GPU.

Also recorded: every read of a tensor's value and every host-to-device copy, with the vd line that made it.
A read of a CUDA value or a blocking copy to the GPU synchronises the GPU; an edit's UNet calls must make no
such read, and no place may copy to the device in both edit steps (per-device caches fill once).

Substitutions, where fake tensors cannot do what a GPU does: a value read returns a placeholder (True, 1,
1.0; False for torch.equal); `Tensor.numpy()` of a fake CPU tensor gives zeros (of a CUDA one it raises, as
torch does); `torch.Generator(device="cuda")` is a CPU generator that says cuda; one-element tensors are not
constant-folded (their ops would run for real); and autograd's engine, which asks the CUDA driver for a
context, is replaced by `_backward` (device checks, reachability, zero gradients on the inputs' devices);
the VAE and text encoder wait on the fake CPU and `.to(device)` remakes their fake tensors there (nn.Module.to
cannot move fake tensors; the copy is not recorded as a host-to-device copy).
docs/concepts/memory.md ("Running on a GPU") has what this proves and what it cannot.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError, FakeTensorMode

from conftest import make_workspace

aten = torch.ops.aten
CUDA = torch.device("cuda")
FRAMES, SIZE, STEPS = 4, 64, 3  # 8x8 latents; 3 steps so that step 1 has STDG (the last step has none)
SOURCE = "a brown bear walking on rocky terrain"


# ------------------------------------------------------------------------------------------- fake CUDA
@dataclass
class Events:
    """What a pass did that costs on a GPU: data reads (host syncs when on CUDA) and host-to-device copies."""

    reads: list[tuple[str, str]] = field(default_factory=list)  # (device, where)
    h2d: list[tuple[str, str]] = field(default_factory=list)  # (op, where)

    def cuda_reads(self) -> list[str]:
        return [w for d, w in self.reads if d.startswith("cuda")]


def _count(events: list[tuple[str, str]]) -> dict[str, int]:
    """{where: how many} of recorded events, for failure messages."""
    out: dict[str, int] = {}
    for _, where in events:
        out[where] = out.get(where, 0) + 1
    return out


def _where() -> str:
    """The innermost vd frame (stages/...) of the current stack, as path:line."""
    for frame in reversed(traceback.extract_stack()):
        if "/stages/" in frame.filename and "/site-packages/" not in frame.filename:
            return f"{frame.filename.split('/stages/')[-1]}:{frame.lineno}"
    return "?"


def _placeholder(t: torch.Tensor) -> Any:
    if t.dtype == torch.bool:
        return True
    return 1.0 if t.is_floating_point() else 1


class FakeCuda(FakeTensorMode):
    """FakeTensorMode that answers data reads with placeholders and records reads and host-to-device copies."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.events = Events()

    def may_turn_const(self, t: torch.Tensor) -> bool:
        return False  # a one-element "constant" would run its ops for real: .to("cuda") would need a GPU

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.events.reads.append((str(args[0].device), _where()))
            return _placeholder(args[0])
        if func is aten.equal.default:  # False: no two region key sets merge, every SA-II group runs
            self.events.reads.append((str(args[0].device), _where()))
            return False
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0].device if func is aten.copy_.default else kwargs.get("device") or src.device
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and torch.device(dst).type == "cuda":
                self.events.h2d.append((str(func), _where()))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _to_fake_cuda(module: nn.Module, dtype: torch.dtype, mode: FakeCuda, device: torch.device = CUDA) -> None:
    """Make every parameter and buffer a fake tensor on `device` (CUDA; floating ones in `dtype`), ties kept;
    plain tensor attributes (SAM2's RoPE table) too. (nn.Module._apply cannot: it swaps tensors that have
    weakrefs.)"""
    new: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in new:
            with mode:
                out = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
            new[id(t)] = nn.Parameter(out, requires_grad=False) if param else out
        return new[id(t)]

    for mod in module.modules():
        mod._parameters.update({k: fake(t, True) for k, t in mod._parameters.items() if t is not None})
        mod._buffers.update({k: fake(t, False) for k, t in mod._buffers.items() if t is not None})
        for name, t in list(vars(mod).items()):
            if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor):
                setattr(mod, name, fake(t, False))


def _mover(module: nn.Module, mode: FakeCuda) -> Any:
    """`module.to(device)` for a module of fake tensors (what nn.Module.to cannot do for them)."""
    def to(device: Any) -> nn.Module:
        _to_fake_cuda(module, torch.float32, mode, torch.device(device))
        return module
    return to


_REAL_GENERATOR = torch.Generator


class _Generator(_REAL_GENERATOR):
    """torch.Generator whose CUDA generators are CPU ones that say they are on cuda (a real one needs a GPU;
    fake tensors never draw from it)."""

    def __new__(cls, device: Any = "cpu") -> "_Generator":
        return super().__new__(cls)

    def __init__(self, device: Any = "cpu") -> None:
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._device


_REAL_NUMPY = torch.Tensor.numpy
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16, torch.int64: np.int64,
          torch.int32: np.int32, torch.uint8: np.uint8, torch.bool: np.bool_}


def _numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> np.ndarray:
    if isinstance(self, FakeTensor):
        if self.device.type != "cpu":  # torch's own refusal, so a missing .cpu() still fails here
            raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() first.")
        if self.dtype not in _NUMPY:  # bf16 included, as torch refuses it
            raise TypeError(f"Got unsupported ScalarType {self.dtype}")
        return np.zeros(tuple(self.shape), dtype=_NUMPY[self.dtype])
    return _REAL_NUMPY(self, *args, **kwargs)


def _graph(outputs: Any) -> tuple[set[int], list[torch.Tensor]]:
    """(ids of the autograd nodes reachable from `outputs`, the leaf tensors they accumulate into)."""
    seen: set[int] = set()
    leaves: list[torch.Tensor] = []
    todo = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        todo.extend(n for n, _ in node.next_functions)
    return seen, leaves


def _backward(outputs: Any, grads: Any, retain_graph: Any, create_graph: Any, inputs: Any = (),
              allow_unused: Any = None, accumulate_grad: bool = True, allow_unreachable: Any = None) -> tuple[Any, ...]:
    """The autograd engine's run, substituted: it cannot run on fake CUDA tensors here (it asks the CUDA
    driver for a primary context). Checks what the engine checks about devices (each gradient on its
    output's device), that the outputs reach the inputs, then gives zero gradients on the inputs' devices."""
    for out, grad in zip(outputs, grads):
        if grad is not None and grad.device != out.device:
            raise RuntimeError(f"Expected all tensors to be on the same device (backward: a gradient on "
                               f"{grad.device} for an output on {out.device})")
    nodes, leaves = _graph(outputs)
    _BACKWARDS.append(len(nodes))
    if accumulate_grad:
        for leaf in (inputs or leaves):
            leaf.grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        return ()
    result = []
    for inp in inputs:
        reached = any(inp is leaf for leaf in leaves) or (inp.grad_fn is not None and id(inp.grad_fn) in nodes)
        if not reached and not allow_unused:
            raise RuntimeError("One of the differentiated Tensors appears to not have been used in the graph")
        result.append(torch.zeros_like(inp) if reached else None)
    return tuple(result)


_BACKWARDS: list[int] = []  # graph sizes of the substituted backward passes


@dataclass
class Gpu:
    """The fake-CUDA tiny model and its mode."""

    models: Any
    mode: FakeCuda

    @contextlib.contextmanager
    def run(self) -> Iterator[Events]:
        """Inside: fake CUDA, CUDA autocast on; yields the events of the block."""
        self.mode.events = Events()
        with self.mode:
            yield self.mode.events

    @contextlib.contextmanager
    def watch(self) -> Iterator[Events]:
        """Inside gpu.run(): the events of this block only."""
        outer, self.mode.events = self.mode.events, Events()
        try:
            yield self.mode.events
        finally:
            inner, self.mode.events = self.mode.events, outer
            outer.reads += inner.reads
            outer.h2d += inner.h2d


@pytest.fixture(scope="module")
def gpu() -> Iterator[Gpu]:
    import stages.models.ops as ops
    from stages.models.load import load_models

    with pytest.MonkeyPatch.context() as mp:
        # CUDA autocast refuses to switch on without a GPU; the fake CUDA tensors take it like real ones
        mp.setattr("torch.cuda.amp.common.amp_definitely_not_available", lambda: False)
        mp.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: True)
        mp.setattr(torch, "Generator", _Generator)
        mp.setattr(torch.Tensor, "numpy", _numpy)
        mp.setattr(torch.autograd, "_engine_run_backward", _backward)
        mp.setattr(ops, "_TIMESTEPS", {})  # the per-device timestep cache would keep this mode's tensors
        mode = FakeCuda()
        models = load_models("tiny", device="cpu")
        # as load_models places them on a GPU: the VAE and text encoder in host memory between their calls
        _to_fake_cuda(models.unet, torch.bfloat16, mode)
        for module in (models.vae, models.text_encoder):
            _to_fake_cuda(module, torch.float32, mode, torch.device("cpu"))
            module.to = _mover(module, mode)  # ops.on_device moves them for their calls
        models.device, models.dtype = CUDA, torch.bfloat16
        yield Gpu(models, mode)


def on_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert isinstance(t, FakeTensor) and t.device.type == "cuda", (type(t), getattr(t, "device", None))


# ------------------------------------------------------------------------------------------- harness
def test_harness_catches_a_cpu_tensor(gpu):
    """The check itself: a CPU tensor mixed into CUDA work raises; CUDA autocast runs bf16 matmuls."""
    with gpu.run() as ev:
        x = torch.zeros(3, 4, device=CUDA)
        with pytest.raises(FakeTensorDeviceMismatchError):
            x + torch.ones(4)
        with pytest.raises(FakeTensorDeviceMismatchError):
            torch.isin(x.long(), torch.tensor([1, 2]))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert (x @ x.T).dtype == torch.bfloat16
            assert torch.nn.functional.group_norm(x[None].bfloat16(), 1).dtype == torch.float32
        assert float(x.sum()) == 1.0 and ev.cuda_reads()
        w = torch.zeros(4, device=CUDA, requires_grad=True)
        (x * w).sum().backward()
        on_cuda(w.grad)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(x.sum() * 1.0, w)  # w unused
        with pytest.raises(RuntimeError, match="same device"):
            (x * w).backward(torch.ones(3, 4))
        x.add_(torch.ones(4).to(CUDA))
        assert len(ev.h2d) == 1
        with pytest.raises(TypeError):
            x.numpy()


# ------------------------------------------------------------------------------------------- invert
def _invert_cfg(**kw: Any) -> Any:
    from stages.invert.config import InvertConfig

    return InvertConfig(**{"prompt": SOURCE, "model": "tiny", "steps": STEPS, "null_steps": 1,
                           "checkpointing": "off", "window": FRAMES, "overlap": 0, **kw})


@dataclass
class Inv:
    """What run_invert's _run holds on the device before the per-step loop."""

    ws: Any
    cfg: Any
    schedule: Any
    passes: Any
    controller: Any
    c_src: torch.Tensor
    neg: torch.Tensor
    latents: torch.Tensor
    fg: torch.Tensor
    arrays: dict[str, Any]


def _prepare(gpu: Gpu, tmp_path: Path, window: int = FRAMES, overlap: int = 0, **kw: Any) -> Inv:
    """Inside gpu.run(): text embeddings, the trajectory (zeros: the DDIM pass has its own test), the
    foreground mask and the step arrays, as stages.invert.run._run makes them."""
    from stages.invert.nulltext import _tensor
    from stages.invert.passes import Passes, clip_windows
    from stages.invert.store import _open_arrays
    from stages.method import ddim
    from stages.method.control.controller import AttentionController, install
    from stages.models.ops import encode_text

    models, dev = gpu.models, gpu.models.device
    ws = make_workspace(tmp_path / "ws", frames=FRAMES, size=SIZE)
    cfg = _invert_cfg(window=window, overlap=overlap, **kw)
    schedule = ddim.make_schedule(cfg.schedule, STEPS)
    passes = Passes(models, None, clip_windows(FRAMES, cfg, models.max_frames))
    controller = install(models.unet, AttentionController())
    c_src = encode_text(models, [cfg.prompt]).to(dev).expand(FRAMES, -1, -1)
    neg = encode_text(models, [cfg.negative_prompt]).to(dev)
    latents = _tensor(np.zeros((STEPS + 1, FRAMES, 4, SIZE // 8, SIZE // 8), np.float32), dev)
    fg = torch.from_numpy(ws.read("masks/edit").astype(bool)).to(dev)
    arrays = _open_arrays(ws, STEPS, FRAMES, int(neg.shape[-1]), tuple(latents.shape[1:]), False)
    on_cuda(c_src, neg, latents, fg)
    return Inv(ws, cfg, schedule, passes, controller, c_src, neg, latents, fg, arrays)


def _stdg(inv: Inv) -> Any:
    """The STDG object(s) of the run: one, or one per window (stages.invert.run._run)."""
    from stages.invert.stdg import STDG
    from stages.method.guidance import RegionMasks

    hw = tuple(inv.latents.shape[-2:])
    windows = inv.passes.windows
    coef = inv.cfg.coefficients()
    if windows.single:
        return STDG(inv.passes, inv.controller, RegionMasks(inv.fg, hw), inv.c_src, coef)
    return [STDG(inv.passes, inv.controller, RegionMasks(inv.fg[s:e], hw), inv.c_src[s:e], coef)
            for s, e in windows.spans]


def _null_text_step(inv: Inv, i: int, phi: torch.Tensor, stdg: Any) -> tuple[Any, Any, dict[str, Any]]:
    from stages.invert.direct import step_config
    from stages.invert.nulltext import _step
    from stages.invert.store import _commit

    cfg = step_config(inv.cfg)
    z_t = inv.latents[STEPS - i][None].clone()
    z_next, phi_i, record = _step(i, inv.schedule, inv.latents, z_t, phi, cfg, cfg.coefficients(), inv.passes,
                                  stdg, inv.c_src, lambda *a, **k: None, max(int(cfg.null_steps), 1))
    _commit(inv.ws, inv.arrays, i, STEPS, z_next, phi_i, record, FRAMES)
    on_cuda(z_next, phi_i, record["G"])
    assert z_next.dtype == phi_i.dtype == torch.float32  # the workspace keeps float32 whatever the compute dtype
    return z_next, phi_i, record


def test_vae_encode_and_ddim_inversion(gpu, tmp_path):
    """vae_encode (noise from a generator on the model device), one DDIM inversion step, the write."""
    from stages.method import ddim
    from stages.models.ops import vae_encode

    with gpu.run() as ev:
        inv = _prepare(gpu, tmp_path)
        z0 = vae_encode(gpu.models, inv.ws.read("video/frames"), seed=42).to(CUDA).contiguous()
        on_cuda(z0)
        assert z0.dtype == torch.float32 and tuple(z0.shape) == (FRAMES, 4, 8, 8)
        j = STEPS - 1
        with torch.no_grad():
            eps = inv.passes.eps(z0[None], inv.schedule.timesteps[j], inv.c_src)
            z = ddim.ddim_inverse_step(z0[None], eps, inv.schedule.prev[j], inv.schedule.timesteps[j])
        on_cuda(eps, z)
        assert eps.dtype == z.dtype == torch.float32
        inv.ws.write_array("inversion/latents", torch.stack([z0, z[0]]).contiguous().cpu().numpy())
    assert not ev.cuda_reads(), ev  # no host sync from encoding to the stored trajectory


def test_null_text_step_with_stdg(gpu, tmp_path):
    """Step 1 of null-text inversion: STDG targets (truncated GT pass) and gradient, eps_c, one Adam
    iteration on phi, the final update and the commit; checkpointing off."""
    with gpu.run() as ev:
        inv = _prepare(gpu, tmp_path)
        phi = inv.neg.repeat(FRAMES, 1, 1).float()
        _, _, record = _null_text_step(inv, 1, phi, _stdg(inv))
        assert record["targets"] is not None and record["inner"] == 1
        on_cuda(*[v for pair in record["targets"].temporal.values() for v in pair],
                *record["targets"].keys.values())
    print("cuda reads:", ev.cuda_reads(), "h2d:", ev.h2d)


@pytest.mark.parametrize("level, units", [("blocks", 9), ("layers", 64)])
def test_windows_with_checkpointing(gpu, tmp_path, level, units):
    """Step 1's gradient passes over two overlapping windows (STDG per window blended, the windowed null-text
    backward) with the UNet's blocks (4 down, mid, 4 up) or the layers inside them checkpointed. The rest of
    the step is the single-window one's, on blended predictions."""
    from stages.invert.checkpointing import checkpointed
    from stages.invert.nulltext import _null_text_backward_windowed
    from stages.invert.stdg import _windowed_stdg

    with gpu.run() as ev:
        inv = _prepare(gpu, tmp_path, window=3, overlap=2)
        assert len(inv.passes.windows.spans) == 2
        t, tp = inv.schedule.timesteps[1], inv.schedule.prev[1]
        z_star, z_t = inv.latents[STEPS - 1][None], inv.latents[STEPS - 1][None].clone()
        phi = inv.neg.repeat(FRAMES, 1, 1).float().requires_grad_(True)
        before = len(_BACKWARDS)
        with checkpointed(gpu.models.unet, inv.controller, level) as wrapped:
            assert wrapped == units
            G, eps_c, targets, _, _ = _windowed_stdg(_stdg(inv), inv.passes.windows, z_star, z_t, t, (True, True), ())
            loss = _null_text_backward_windowed(inv.passes, z_t, t, tp, phi, eps_c, G, inv.latents[STEPS - 2][None],
                                                inv.cfg.cfg)
        on_cuda(G, eps_c, loss, phi.grad)
        assert len(targets) == 2
        # STDG per window (2), dL/d(eps_u) of the blended prediction (1), each window's null-text backward (2)
        assert len(_BACKWARDS) - before == 5
    assert len(ev.cuda_reads()) == 8  # the 4 STDG loss values of each window (stdg.py), nothing else


def test_direct_and_negative_prompt_inversion(gpu, tmp_path):
    """direct: run_direct's step 1 (uncond forward, cond forward recording the STDG targets, the offset,
    the commit); negative-prompt: phi from the source prompt, the step without Adam iterations."""
    from stages.invert.direct import initial_null, run_direct
    from stages.common.progress import Progress

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with gpu.run():
        inv = _prepare(gpu, tmp_path, method="direct")
        with pytest.raises(Stop):
            run_direct(inv.ws, inv.cfg, Progress(quiet=True), inv.schedule, inv.latents, inv.neg, inv.c_src,
                       inv.passes, _stdg(inv), inv.arrays, 1, None, stop)
        assert bool(inv.ws.read("inversion/done")[1])

        neg = _prepare(gpu, tmp_path / "np", method="negative-prompt")
        phi = initial_null(neg.cfg, neg.neg, neg.c_src)
        on_cuda(phi)
        _, phi_i, record = _null_text_step(neg, STEPS - 1, phi, _stdg(neg))
        assert record["inner"] == 0


# ------------------------------------------------------------------------------------------- edit
EDIT_STEPS = 2


def _columns(lo: int, hi: int) -> np.ndarray:
    m = np.zeros((FRAMES, SIZE, SIZE), np.uint8)
    m[:, :, lo:hi] = 1
    return m


def _inversion(method: str = "null-text", window: int | None = None) -> Any:
    """A finished inversion as load_inversion returns it (zeros: only devices and shapes matter here)."""
    from stages.invert.store import Inversion
    from stages.method.ddim import make_schedule

    S, lat = EDIT_STEPS, (FRAMES, 4, SIZE // 8, SIZE // 8)
    attrs = {"method": method, "config": {"seed": 42}, "status": "done",
             "windows": {"window": window, "overlap": window - 1} if window else {}}
    return Inversion(schedule=make_schedule("vd", S), latents=np.zeros((S + 1,) + lat, np.float32),
                     null_embeddings=np.zeros((S, FRAMES, 77, 32), np.float32),
                     guidance=np.zeros((S,) + lat, np.float32), prompt=SOURCE, negative_prompt="",
                     subject="brown bear", region="foreground", cfg=7.5, shared_null=False, model={"spec": "tiny"},
                     attrs=attrs, offsets=np.zeros((S,) + lat, np.float32) if method == "direct" else None)


def _edit(gpu: Gpu, ws: Any, inv: Any, **kw: Any) -> tuple[list[Events], dict[str, Any]]:
    """stages.edit.sampling.edit_latents on fake CUDA; (events of each UNet call, run stats)."""
    from stages.common.progress import Progress
    from stages.edit import sampling
    from stages.edit.run import EditConfig, plan_edit
    from stages.models import ops

    job = plan_edit(ws, inv, EditConfig(**kw))
    calls: list[Events] = []
    real = ops.unet_eps

    def watched(*args: Any, **kwargs: Any) -> Any:
        with gpu.watch() as ev:
            out = real(*args, **kwargs)
        calls.append(ev)
        return out

    for t in inv.schedule.edit_timesteps:  # the per-device timestep cache: one copy per timestep, before
        ops._timestep(gpu.models.device, int(t))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "unet_eps", watched)
        e, stats = sampling.edit_latents(ws, inv, gpu.models, job, Progress(quiet=True))
    on_cuda(e)
    assert e.dtype == torch.float32 and tuple(e.shape) == (FRAMES, 4, 8, 8)
    return calls, stats


def assert_no_syncs(calls: list[Events]) -> None:
    """No UNet call of an edit reads a CUDA tensor back, and no place copies to the device in both steps
    (the per-device caches of masks and indices fill once, when first used): either would synchronise the
    GPU in every layer of every step. So each feature with such a cache runs in both steps in some test."""
    reads = [w for ev in calls for w in ev.cuda_reads()]
    assert not reads, _count([("", w) for w in reads])
    half = len(calls) // EDIT_STEPS
    first = {w for ev in calls[:half] for _, w in ev.h2d}
    again = [h for ev in calls[half:] for h in ev.h2d if h[1] in first]
    assert not again, "\n".join(f"{k}: {v}" for k, v in _count(again).items())


def test_edit_p2p_sa1_sa2_blend_over_windows(gpu, tmp_path):
    """A subject edit with every attention edit: SA-I (step 0), SA-II (step 1), P2P refine with a reweighted
    word, the local blend, over two temporal windows. Its UNet calls copy nothing to the device and read
    nothing back."""
    with gpu.run():
        ws = make_workspace(tmp_path / "ws", frames=FRAMES, size=SIZE)
        calls, stats = _edit(gpu, ws, _inversion(window=3), prompt="big tiger cub", tau_s=0.5,
                             reweight={"tiger": 2.0}, blend=["bear", "tiger"], blend_start=0.0,
                             sa1_max_tokens=64)
    assert stats["windows"]["spans"] == [[0, 3], [1, 4]]
    assert {"sa1", "sa2", "p2p"} <= set(stats["calls"]), stats["calls"]
    assert stats["cross_mode"] == "refine"
    assert_no_syncs(calls)


def test_edit_regions_with_layout_from_direct_inversion(gpu, tmp_path):
    """A per-region edit (SA-II per object, the layout bias in cross and self attention, the local blend per
    object with an unedited object excluded) from a direct inversion (its source branch and offsets)."""
    import stages.method.control.layout as layout

    objects = {"bear": (_columns(0, 24), "brown bear"), "rocks": (_columns(40, 64), "rocky terrain")}
    grouped = []
    real = layout.region_sa2_attention
    with gpu.run(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout, "region_sa2_attention", lambda *a: grouped.append(1) or real(*a))
        ws = make_workspace(tmp_path / "ws", frames=FRAMES, size=SIZE, objects=objects)
        calls, stats = _edit(gpu, ws, _inversion("direct"), regions={"bear": "white tiger"}, layout_steps=1.0,
                             tau_s=0.0)
    assert stats["regions"] == ["bear"] and stats["layout_steps"] == EDIT_STEPS
    assert {"sa2", "layout", "layout_self"} <= set(stats["calls"]), stats["calls"]
    assert grouped  # SA-II with a key set per object group
    assert_no_syncs(calls)


def test_edit_first_frame_background_from_negative_prompt(gpu, tmp_path):
    """--first-frame (the image's VAE latent, SparseCtrl residuals on the target slots) with --background
    (SA-II hides the source background) from a negative-prompt inversion (recon-uncond is phi)."""
    from PIL import Image

    from stages.models.sparsectrl import tiny_sparsectrl

    image = tmp_path / "first.png"
    with gpu.run():
        ws = make_workspace(tmp_path / "ws", frames=FRAMES, size=SIZE)
        Image.fromarray(np.ascontiguousarray(ws.read("video/frames")[0][:, ::-1])).save(image)
        ctrl = tiny_sparsectrl()
        _to_fake_cuda(ctrl, torch.bfloat16, gpu.mode)  # as load_sparsectrl places it: the UNet's dtype
        with pytest.MonkeyPatch.context() as mp:
            import stages.edit.first_frame as ff

            real = ff.plan_first_frame
            mp.setattr(ff, "plan_first_frame", lambda ws, cfg: _with_ctrl(real(ws, cfg), ctrl))
            calls, stats = _edit(gpu, ws, _inversion("negative-prompt"), prompt="white tiger", background=True,
                                 first_frame=str(image), tau_s=0.0)
    assert stats["first_frame"]["calls"] == EDIT_STEPS
    assert stats["calls"]["sa2"] and stats["calls"]["p2p"]
    assert_no_syncs(calls)


def _with_ctrl(ff: Any, ctrl: nn.Module) -> Any:
    from stages.models.sparsectrl import SparseCtrl

    ff.controlnet = SparseCtrl(ctrl, "tiny (fake cuda)", "tiny-sparsectrl")
    return ff


# ------------------------------------------------------------------------------------------- VAE, SAM2
def test_vae_decode(gpu):
    """vae_decode's per-frame loop down to the uint8 frames it copies back; the VAE is on the GPU for the
    call only (host memory before and after: the UNet passes have its memory)."""
    from stages.models.ops import on_device, vae_decode

    vae = gpu.models.vae
    assert next(vae.parameters()).device.type == "cpu"
    with gpu.run() as ev:
        frames = vae_decode(gpu.models, torch.zeros(2, 4, 8, 8, device=CUDA))
        with on_device(gpu.models, vae):
            assert {p.device.type for p in vae.parameters()} == {"cuda"}
    assert frames.dtype == np.uint8 and frames.shape == (2, 64, 64, 3)
    assert not ev.cuda_reads() and not ev.h2d, ev
    assert {p.device.type for p in vae.parameters()} == {"cpu"}


def test_sam2_tracking_on_cuda(gpu):
    """track_objects with the random SAM2 on (fake) CUDA: frames fed from memory onto the device, two
    objects prompted by a point and a box, both propagation directions under bf16 autocast, overlaps resolved."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    from stages.models.sam2_track import load_predictor, track_objects

    predictor = load_predictor(None, device="cpu")
    predictor.__class__ = SAM2VideoPredictor  # load_predictor's float32-memory subclass is for the CPU only
    _to_fake_cuda(predictor, torch.float32, gpu.mode)
    assert predictor.device.type == "cuda"
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    with gpu.run() as ev:
        masks, pairs = track_objects(predictor, frames, [([(10.0, 10.0, 1)], None), ((), (30, 30, 60, 60))],
                                     prompt_frame=1)
    assert masks.shape == (2, 3, 64, 64) and masks.dtype == np.uint8 and pairs.shape == (2, 2)
    assert ev.h2d  # the frames, the prompts (SAM2's own copies are counted here too)


# ------------------------------------------------------------------------------------------- CUDA behaviour
def test_cuda_autocast_runs_these_in_fp32(gpu):
    """What bf16 autocast does to the ops of vd's UNet on CUDA (docs/concepts/memory.md, "Running on a GPU"):
    matmuls, convolutions and fused attention in bf16; GroupNorm, LayerNorm and softmax in float32 (CPU autocast
    keeps them in bf16, which is why bf16 on the CPU is not the GPU's numerics)."""
    import torch.nn.functional as F

    with gpu.run():
        x = torch.empty(2, 8, 4, 4, device=CUDA, dtype=torch.bfloat16)
        w = torch.empty(8, 8, 3, 3, device=CUDA)
        q = torch.empty(2, 2, 16, 8, device=CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert F.conv2d(x.float(), w, padding=1).dtype == torch.bfloat16
            assert F.linear(q, q[0, 0]).dtype == torch.bfloat16
            assert F.scaled_dot_product_attention(q, q, q).dtype == torch.bfloat16
            assert F.group_norm(x, 4).dtype == torch.float32
            assert F.layer_norm(q.bfloat16(), (8,)).dtype == torch.float32
            assert torch.softmax(q.bfloat16(), -1).dtype == torch.float32
            assert F.silu(x).dtype == torch.bfloat16  # elementwise ops keep their input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(torch.zeros(2, 8, 4, 4, dtype=torch.bfloat16), 4).dtype == torch.bfloat16


def test_sdpa_flash_refuses_vd_masks(gpu, capfd):
    """SA-II's boolean key mask (and any attn_mask) rules flash attention out on CUDA: torch's own filter says
    so. Unmasked calls of vd's shapes (bf16, head dim 40 at 512 px) pass every flash check up to the
    hardware check, which is the first one a machine without a GPU cannot pass."""
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    with gpu.run():
        n = 64 * 64  # up_blocks.3 at 512 px; SA-II's keys are [source | edit]
        q = torch.empty(2 * FRAMES, 8, n, 40, device=CUDA, dtype=torch.bfloat16)
        k = torch.empty(2 * FRAMES, 8, 2 * n, 40, device=CUDA, dtype=torch.bfloat16)
        mask = torch.ones(2 * FRAMES, 1, 1, 2 * n, dtype=torch.bool, device=CUDA)
        capfd.readouterr()
        assert not can_use_flash_attention(SDPAParams(q, k, k, mask, 0.0, False, False), True)
        assert "does not support non-null attn_mask" in capfd.readouterr().err
        assert not can_use_flash_attention(SDPAParams(q, q, q, None, 0.0, False, False), True)
        err = capfd.readouterr().err
        assert "attn_mask" not in err and "requires a CUDA device" in err
        assert not can_use_efficient_attention(SDPAParams(q, k, k, mask, 0.0, False, False), True)
        assert "requires a CUDA device" in capfd.readouterr().err  # memory-efficient checks hardware first
