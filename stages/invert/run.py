"""Stage `vd invert`: DDIM inversion + multi-frame null-text optimisation with STDG (ALGORITHM.md §1.3-§4).

Per sampling step i (t = schedule.timesteps[i], t_prev = schedule.prev[i]), optimised mode:
1. GT pass UNet(z*_t, t, c_src), no grad, stopped after the last STDG layer, reduced to compact targets;
2. one grad pass UNet(z_t, t, c_src) with z_t.requires_grad, decoder after up_blocks.2 detached; ONE backward
   of the coefficient-weighted loss gives G_i; its output (detached) is eps_c;
3. null-text: Adam on phi (F or 1, 77, D) float32, up to null_steps iterations (1 forward + 1 backward each);
4. z_t <- ddim_step(z_t, cfg(eps_u(phi_i), eps_c), G_i): one forward (only eps_u is recomputed).
STDG is skipped at i = 0 (z_t == z*_T, so G == 0 exactly) and where its coefficient sqrt(1-a_prev)sqrt(1-a_t)
is 0 (the last step); G is stored as zeros there. Plain mode (`plain=True`, the benchmark baseline) does it
as the reference code and pays what it pays: 4 full GT + 4 full grad forwards + 4 backwards at every step,
a separate eps_c forward, a batch-2 final update, trainable UNet weights (weight gradients in every
null-text backward), explicit float32 attention maps in every layer, gc.collect() (+ empty_cache on CUDA)
after every inner iteration and STDG component. Same results up to floating-point rounding.
A PhaseTimer passed to run_invert records seconds per phase of every step (bench.py --profile).

Workspace (see notes/interfaces.md; S steps, F frames):
  inversion/latents            f32 (S+1, F, 4, h, w)  [0] = z0 (VAE sample), [k] = z* at timesteps[S-k]
  inversion/recon_latents      f32 (S+1, F, 4, h, w)  same indexing: [S] = z*_T, step i writes [S-1-i]
  inversion/null_embeddings    f32 (S, F, 77, D)      phi_i per frame (repeated per frame with shared_null)
  inversion/stdg/guidance      f32 (S, F, 4, h, w)    G_i (zeros where skipped)
  inversion/stdg/components    f32 (S, 4, F, 4, h, w) [T_fg, T_bg, K_fg, K_bg] gradients (store_components)
  inversion/targets/temporal/<layer>/value f16 (S, HW, heads, F), .../index u8 (S, HW, heads, F)
  inversion/targets/keys/<layer>           f32 (S, 2, F, C)  [fg, bg] masked-mean keys (zeros where skipped)
  inversion/step_stats         f64 (S, 7)  [inner iterations, first and last null-text loss (before the
                                            update), forwards, GT forwards, backwards, seconds]
  inversion/done               bool (S+1,) [i] = step i committed (data first), [S] = report written
  inversion/reconstruction     u8 (F, H, W, 3); reconstruction.mp4, preview.gif (source | reconstruction)
Group attrs: status, model {spec, fingerprint}, prompt, negative_prompt, subject, region ("foreground" |
"background"), stdg (coefficients), cfg, shared_null, schedule, timesteps, prev, edit_timesteps, edit_prev,
config, settings, config_hash, and when done: recon metrics, timings, counts, summary.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.io import locks as stagelock
from stages.common.config import Layer, build_config, changed_settings, config_dict, config_hash
from stages.common.errors import InputError, Interrupted, UsageError
from stages.common.progress import Progress
from stages.method.windows import MAX_WINDOW, Windows, blend, check_window, plan_windows, weight_tensor
from stages.io.workspace import Workspace
from stages.common.digest import digest

GROUP = "inversion"
REGIONS = ("foreground", "background")
DEFAULT_STDG = {"foreground": (0.5, 0.5, 0.0, 0.5), "background": (0.5, 0.5, 0.5, 0.0)}
EARLY_STOP = 1e-5
EARLY_STOP_SLOPE = 2e-5
BASE_LR = 0.01
FLOAT_STATS = ("first_loss", "null_loss", "seconds")
STAT_COLUMNS = ("inner", "first_loss", "null_loss", "forwards", "gt_forwards", "backwards", "seconds")
# settings carried over from a stored inversion when a rerun does not give them (resume with `vd invert WS`)
CARRIED = ("prompt", "subject", "negative_prompt", "model", "steps", "cfg", "null_steps", "stdg", "region",
           "use_stdg", "shared_null", "schedule", "seed", "per_frame_groupnorm", "store_components", "plain",
           "dtype", "window", "overlap")


@dataclass
class InvertConfig:
    """Settings of `vd invert` (preset section `invert:`, then CLI flags)."""

    prompt: str = ""
    subject: str | None = None
    negative_prompt: str = ""
    model: str = "sd15-animatediff-v3"
    steps: int = 50
    cfg: float = 7.5  # reference form eps_c + cfg (eps_c - eps_u) == diffusers guidance_scale cfg + 1
    null_steps: int = 10
    stdg: list[float] | None = None  # [eta_f, eta_b, zeta_f, zeta_b]; None: the region's default
    region: str = "foreground"
    use_stdg: bool = True
    shared_null: bool = False
    schedule: str = "vd"
    seed: int = 42
    per_frame_groupnorm: bool = True
    store_components: bool = False
    plain: bool = False
    compare_ddim: bool = False
    window: int = 16  # frames per UNet call; longer clips run in overlapping windows (stages/windows.py)
    overlap: int = 4  # frames shared by neighbouring windows
    device: str = "auto"
    dtype: str = "auto"
    restart: bool = False
    preset: str | None = None

    def coefficients(self) -> tuple[float, float, float, float]:
        """Effective STDG coefficients (all zero with use_stdg off)."""
        if not self.use_stdg:
            return (0.0, 0.0, 0.0, 0.0)
        if self.stdg is None:
            return DEFAULT_STDG[self.region]
        from stages.method.guidance import parse_coefficients  # imports torch: only when needed (fast refusals)

        try:
            return parse_coefficients(self.stdg)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


@dataclass
class Inversion:
    """A finished inversion as the edit stage needs it (arrays are float32 numpy)."""

    schedule: Any  # stages.method.ddim.Schedule
    latents: np.ndarray  # (S+1, F, 4, h, w), [S - i] is z*_{t_i}
    null_embeddings: np.ndarray  # (S, F, 77, D)
    guidance: np.ndarray  # (S, F, 4, h, w)
    prompt: str
    negative_prompt: str
    subject: str | None
    region: str
    cfg: float
    shared_null: bool
    model: dict[str, Any]  # {spec, fingerprint}
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.null_embeddings.shape[0])

    @property
    def frames(self) -> int:
        return int(self.latents.shape[1])


def load_inversion(ws: Workspace) -> Inversion:
    """Read a finished inversion; InputError when the workspace has none (or an unfinished one)."""
    from stages.method.ddim import make_schedule

    attrs = ws.group_attrs(GROUP)
    if not attrs or not ws.has(f"{GROUP}/done") or not ws.has(f"{GROUP}/latents"):
        raise InputError(f"workspace {ws.path} has no inversion; run `vd invert {ws.path} --prompt ...` first")
    steps = int(attrs["steps"])
    if not bool(np.all(ws.read(f"{GROUP}/done")[:steps])):
        raise InputError(f"the inversion in {ws.path} is unfinished; rerun `vd invert {ws.path}` to complete it")
    return Inversion(
        schedule=make_schedule(attrs["schedule"], steps),
        latents=ws.read(f"{GROUP}/latents"),
        null_embeddings=ws.read(f"{GROUP}/null_embeddings"),
        guidance=ws.read(f"{GROUP}/stdg/guidance"),
        prompt=attrs["prompt"], negative_prompt=attrs.get("negative_prompt", ""), subject=attrs.get("subject"),
        region=attrs.get("region", "foreground"), cfg=float(attrs["cfg"]),
        shared_null=bool(attrs.get("shared_null", False)), model=dict(attrs.get("model", {})), attrs=attrs,
    )


# --------------------------------------------------------------------------------------------- config

def resolve_config(ws: Workspace, *layers: dict[str, Any] | None) -> InvertConfig:
    """InvertConfig from the stored inversion's settings (unless restart), then `layers` (preset, flags).

    Rerunning with fewer flags therefore resumes with the stored settings; a flag that differs from them
    is refused later by run_invert (unless restart).
    """
    restart = any((layer or {}).get("restart") for layer in layers)
    stored = {} if restart else dict(ws.group_attrs(GROUP).get("config") or {})
    base = Layer({k: v for k, v in stored.items() if k in CARRIED}, f"stored settings of {ws.path}/{GROUP}")
    return build_config(InvertConfig, base, *layers)


def validate(cfg: InvertConfig) -> None:
    """Refuse settings that cannot work, with one-line messages."""
    from stages.common.config import check_config
    from stages.method.ddim import SCHEDULES

    check_config(cfg)  # types, finiteness, int64 (e.g. --seed): before anything is touched
    if not cfg.prompt or not cfg.prompt.strip():
        raise UsageError("--prompt is required: describe the source video (e.g. \"a brown bear walking on rocks\")")
    if cfg.subject is not None and cfg.subject.strip().lower() not in cfg.prompt.lower():
        raise UsageError(f"--subject {cfg.subject!r} does not occur in the prompt {cfg.prompt!r}")
    if cfg.region not in REGIONS:
        raise UsageError(f"region must be one of {', '.join(REGIONS)}, got {cfg.region!r}")
    if cfg.schedule not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 2 <= int(cfg.steps) <= 1000:
        raise UsageError(f"--steps must be in 2..1000, got {cfg.steps}")
    if not 0 <= int(cfg.null_steps) <= 10000:
        raise UsageError(f"--null-steps must be in 0..10000, got {cfg.null_steps}")
    if not cfg.model.strip():
        raise UsageError("--model must not be empty")
    if not math.isfinite(float(cfg.cfg)) or float(cfg.cfg) < 0:
        raise UsageError(f"--cfg must be a finite number >= 0, got {cfg.cfg}")
    check_window(cfg.window, cfg.overlap)
    cfg.coefficients()


def _settings(cfg: InvertConfig) -> dict[str, Any]:
    """Settings the stored steps depend on (before the model is loaded)."""
    return {"model": cfg.model, "prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt,
            "steps": int(cfg.steps), "cfg": float(cfg.cfg), "null_steps": int(cfg.null_steps),
            "stdg": list(cfg.coefficients()), "region": cfg.region, "shared_null": bool(cfg.shared_null),
            "schedule": cfg.schedule, "seed": int(cfg.seed), "per_frame_groupnorm": bool(cfg.per_frame_groupnorm),
            "store_components": bool(cfg.store_components), "plain": bool(cfg.plain),
            "window": int(cfg.window), "overlap": int(cfg.overlap)}


def _refuse_changes(old: dict[str, Any], new: dict[str, Any], ws: Workspace) -> None:
    changed = [k for k in changed_settings(old, new) if k in new]
    if not changed:
        return

    def show(k: str) -> str:
        a, b = old.get(k), new.get(k)
        return f"{k} {a!r} -> {b!r}" if len(repr(a)) + len(repr(b)) < 60 else k

    listed = "; ".join(show(k) for k in changed)
    raise InputError(f"the inversion in {ws.path} was made with other settings ({listed}); "
                     f"rerun with the same settings to resume, or pass --restart to discard it")


def _digest(data: np.ndarray | None) -> str | None:
    return None if data is None else digest(data)


def stored_settings(cfg: InvertConfig, frames: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
    """What a stored inversion depends on (before the model is loaded): the settings plus digests of the
    frames and, when STDG uses it, the mask. A resume (or `vd batch`'s skip) needs these to be equal."""
    settings = _settings(cfg)
    settings.update(frames=_digest(frames), masks=_digest(mask) if any(cfg.coefficients()) else None)
    return settings


# --------------------------------------------------------------------------------------------- engine

class PhaseTimer:
    """Optional wall-clock profile of the null-text steps (`bench.py --profile`): seconds per phase per step.

    Pass one to run_invert(timer=...); without one every phase guard is a shared no-op context. On CUDA
    each phase boundary synchronises, so the figures are attributable (and the profiled run is slower).
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []  # per null-text step: {phase: seconds, "step": i, "total": s}
        self._sync: Any = None
        self._t0 = 0.0

    def bind(self, device: Any) -> None:
        import torch

        self._sync = torch.cuda.synchronize if getattr(device, "type", "") == "cuda" else None

    def begin(self, i: int) -> None:
        """Start step i (its phases accumulate until end())."""
        self.steps.append({"step": float(i)})
        self._t0 = time.perf_counter()

    def end(self) -> None:
        """Close the current step: its "total" becomes the step's wall-clock seconds."""
        if self._sync:
            self._sync()
        self.steps[-1]["total"] = time.perf_counter() - self._t0

    @contextlib.contextmanager
    def __call__(self, name: str) -> Any:
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            if self.steps:
                self.steps[-1][name] = self.steps[-1].get(name, 0.0) + time.perf_counter() - t0


_OFF = contextlib.nullcontext()


class Passes:
    """UNet calls with counters: sample-forwards (batch entries), GT forwards, backward passes."""

    def __init__(self, models: Any, timer: PhaseTimer | None = None, windows: Windows | None = None):
        self.models = models
        self.windows = windows  # whole-clip calls run window by window and are blended
        self.forwards = 0
        self.gt_forwards = 0
        self.backwards = 0
        self.timer = timer

    def phase(self, name: str) -> Any:
        """Context timing `name` when profiling; a shared no-op otherwise."""
        return self.timer(name) if self.timer is not None else _OFF

    def eps(self, z: Any, t: int, emb: Any, gt: bool = False) -> Any:
        """Noise prediction for z (B, F, 4, h, w); a whole clip longer than one window is blended over windows.

        emb: (B*F, 77, D) batch-major, frame-minor. Window-sized calls (F < the clip) run as they are.
        """
        windows = self.windows
        if windows is None or windows.single or int(z.shape[1]) != windows.frames:
            return self.eps_window(z, t, emb, gt)
        b, f = int(z.shape[0]), int(z.shape[1])
        rows = emb.reshape(b, f, *emb.shape[1:])
        return blend(windows, lambda s, e: self.eps_window(z[:, s:e], t, rows[:, s:e].reshape(-1, *emb.shape[1:]),
                                                           gt))

    def eps_window(self, z: Any, t: int, emb: Any, gt: bool = False) -> Any:
        """One UNet call on z as given (one window), counted."""
        from stages.models.load import unet_eps

        if gt:
            self.gt_forwards += int(z.shape[0])
        else:
            self.forwards += int(z.shape[0])
        return unet_eps(self.models, z, t, emb)

    def snapshot(self) -> tuple[int, int, int]:
        return self.forwards, self.gt_forwards, self.backwards


class STDG:
    """GT targets and the STDG gradient for one clip (batch 1, conditional branch, source prompt)."""

    def __init__(self, passes: Passes, controller: Any, masks: Any, c_src: Any,
                 coefficients: tuple[float, float, float, float]):
        from stages.method.control.record import stdg_layers

        self.passes = passes
        self.controller = controller
        self.masks = masks
        self.c_src = c_src
        self.coefficients = coefficients
        self.temporal, self.spatial = stdg_layers(controller.names)

    def _reducers(self, targets: Any | None) -> tuple[Any, Any]:
        from stages.method.guidance import gather_top1, masked_mean_keys, temporal_top1

        def on_keys(name: str, keys: Any) -> Any:
            return masked_mean_keys(keys, self.masks.tokens(keys.shape[1]))

        if targets is None:
            return (lambda name, probs: temporal_top1(probs)), on_keys
        return (lambda name, probs: gather_top1(probs, targets.temporal[name][1])), on_keys

    def targets(self, z_star: Any, t: int, need: tuple[bool, bool] = (True, True), truncate: bool = True) -> Any:
        """GT statistics from UNet(z*_t, t, c_src) without grad (stopped after the last needed layer)."""
        import torch

        from stages.method.control.record import Recorder, StopForward
        from stages.method.guidance import Targets

        on_t, on_k = self._reducers(None)
        rec = Recorder(self.controller, self.temporal, self.spatial, on_t if need[0] else None,
                       on_k if need[1] else None, stop_when_complete=truncate)
        with self.passes.phase("gt_forward"), torch.no_grad(), rec:
            try:
                self.passes.eps(z_star, t, self.c_src, gt=True)
            except StopForward:
                pass
        if not rec.complete:
            raise RuntimeError("the GT pass did not reach every STDG layer")
        return Targets(temporal={n: rec.results[n] for n in rec.temporal},
                       keys={n: rec.results[n] for n in rec.spatial})

    def gradient(self, z: Any, t: int, targets: Any, components: tuple[str, ...] = (), combined: bool = True,
                 cut: bool = True) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
        """One grad forward UNet(z, t, c_src): (G or None, eps_c, losses, {component: gradient}).

        G is the gradient of the coefficient-weighted sum (one backward); `components` names extra
        per-component gradients (one backward each).
        """
        import torch

        from stages.method.control.record import Recorder, cut_graph_after
        from stages.method.guidance import COMPONENTS, Generated, combine, stdg_losses

        zg = z.detach().clone().requires_grad_(True)
        on_t, on_k = self._reducers(targets)
        rec = Recorder(self.controller, list(targets.temporal), list(targets.keys),
                       on_t if targets.temporal else None, on_k if targets.keys else None)
        with torch.enable_grad():
            with self.passes.phase("stdg_forward"):
                with rec, (cut_graph_after(self.passes.models.unet) if cut else contextlib.nullcontext()):
                    out = self.passes.eps(zg, t, self.c_src)
                gen = Generated(temporal={n: rec.results[n] for n in rec.temporal},
                                keys={n: rec.results[n] for n in rec.spatial})
                losses = stdg_losses(gen, targets, self.masks)
                wanted = [combine(losses, self.coefficients)] if combined else []
                wanted += [losses[c] for c in components]
            grads = []
            with self.passes.phase("stdg_backward"):
                for k, loss in enumerate(wanted):
                    if loss.requires_grad:
                        grads.append(torch.autograd.grad(loss, zg, retain_graph=k < len(wanted) - 1,
                                                         allow_unused=True)[0])
                        self.passes.backwards += 1
                    else:
                        grads.append(None)
        grads = [torch.zeros_like(z) if g is None else g.detach().to(z.dtype) for g in grads]
        g_total = grads.pop(0) if combined else None
        comps = dict(zip(components, grads))
        assert set(comps) <= set(COMPONENTS)
        return g_total, out.detach(), {k: float(v.detach()) for k, v in losses.items()}, comps


# --------------------------------------------------------------------------------------------- stage

def _require_inputs(ws: Workspace, cfg: InvertConfig) -> tuple[np.ndarray, np.ndarray | None]:
    if not ws.has("video/frames"):
        raise InputError(f"workspace {ws.path} has no video/frames; create it with `vd mask CLIP`")
    frames = ws.read("video/frames")
    mask = ws.read("masks/edit") if ws.has("masks/edit") else None
    if mask is None and any(c != 0 for c in cfg.coefficients()):
        raise InputError(f"workspace {ws.path} has no masks/edit (STDG needs the subject mask): run `vd mask` "
                         f"first, or pass --no-stdg")
    if mask is not None and mask.shape != frames.shape[:3]:
        raise InputError(f"masks/edit has shape {mask.shape} but the frames are {frames.shape[:3]}")
    return frames, mask


def _summary_from_attrs(ws: Workspace) -> dict[str, Any]:
    summary = dict(ws.group_attrs(GROUP).get("summary") or {})
    summary.update(already_done=True, resumed_from=summary.get("steps"))
    return summary


@stagelock.scoped
def run_invert(ws: Workspace, cfg: InvertConfig, progress: Progress, models: Any | None = None,
               timer: PhaseTimer | None = None) -> dict[str, Any]:
    """Invert the workspace clip (resumable); returns a JSON-friendly summary (see module docstring).

    timer: an optional PhaseTimer that receives per-step phase timings (benchmark profiling).
    """
    validate(cfg)
    t_begin = time.perf_counter()
    # one writer: held (and a second writer refused at once) before anything is read for resuming,
    # loaded or removed; released when run_invert returns or raises. `vd mask` waits for the shared hold.
    stagelock.hold(ws.path, stagelock.WORKSPACE, "vd invert", f"workspace {ws.path}", shared=True)
    frames, mask = _require_inputs(ws, cfg)
    clip_windows(len(frames), cfg, MAX_WINDOW)  # window settings refused before anything is touched
    stagelock.hold(ws.path, GROUP, "vd invert", f"the inversion in {ws.path}")
    settings = stored_settings(cfg, frames, mask)
    stored = ws.group_attrs(GROUP)
    resuming = bool(stored.get("settings")) and not cfg.restart
    if resuming:
        _refuse_changes({k: v for k, v in stored["settings"].items() if k in settings}, settings, ws)
        done = ws.read(f"{GROUP}/done") if ws.has(f"{GROUP}/done") else None
        if done is not None and bool(done.all()) and stored.get("status") == "done" and not (
                cfg.compare_ddim and "ddim_psnr" not in (stored.get("recon") or {})):
            progress.log(f"inversion in {ws.path} is already complete")
            return _summary_from_attrs(ws)

    from stages.method.control.controller import AttentionController, install
    from stages.models.load import load_models

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if models is None:
        progress.log(f"loading model {cfg.model} ...")
        models = load_models(cfg.model, device=cfg.device, dtype=cfg.dtype,
                             per_frame_groupnorm=cfg.per_frame_groupnorm)
    elif models.per_frame_groupnorm != cfg.per_frame_groupnorm:
        raise UsageError("the loaded models' per-frame GroupNorm setting differs from the config")
    timings["load_s"] = time.perf_counter() - t0
    settings.update(model_fingerprint=models.fingerprint, dtype=str(models.dtype).removeprefix("torch."))
    if resuming:
        _refuse_changes({k: v for k, v in stored["settings"].items() if k in settings}, settings, ws)
    else:
        ws.remove(GROUP)
    controller = install(models.unet, AttentionController())
    try:
        with _reference_costs(models, controller, cfg.plain):
            return _run(ws, cfg, progress, models, controller, frames, mask, settings, timings, t_begin, timer)
    except KeyboardInterrupt:
        done = ws.read(f"{GROUP}/done") if ws.has(f"{GROUP}/done") else np.zeros(1, bool)
        kept = int(done[: int(cfg.steps)].sum())
        raise Interrupted(f"interrupted; {kept} of {cfg.steps} null-text steps are saved in {ws.path}, "
                          f"rerun the same command to resume") from None
    finally:
        controller.clear()


@contextlib.contextmanager
def _reference_costs(models: Any, controller: Any, plain: bool) -> Any:
    """Plain mode pays what the reference pays: trainable UNet weights (every null-text backward also
    computes and accumulates their gradients, ALGORITHM.md §4, §9.2 item 4) and explicit float32
    attention probabilities in every attention layer instead of fused SDPA (§8.4 item 8). The optimised
    mode runs a frozen UNet with SDPA. Both are undone afterwards (the models may be reused)."""
    from stages.method.control.controller import explicit_attention

    if not plain:
        models.unet.requires_grad_(False)
        yield
        return
    models.unet.requires_grad_(True)
    controller.fallback = explicit_attention
    try:
        yield
    finally:
        controller.fallback = None
        models.unet.requires_grad_(False)
        for p in models.unet.parameters():
            p.grad = None


def _test_delay() -> None:
    delay = float(os.environ.get("VD_TEST_STEP_DELAY", "0") or 0)
    if delay > 0:  # lets tests interrupt a run between committed steps
        time.sleep(delay)


def _run(ws: Workspace, cfg: InvertConfig, progress: Progress, models: Any, controller: Any, frames: np.ndarray,
         mask: np.ndarray | None, settings: dict[str, Any], timings: dict[str, float],
         t_begin: float, timer: PhaseTimer | None = None) -> dict[str, Any]:
    import torch

    from stages.method import ddim
    from stages.method.guidance import RegionMasks
    from stages.models.load import encode_text, vae_encode

    schedule = ddim.make_schedule(cfg.schedule, int(cfg.steps))
    S, F = schedule.steps, int(frames.shape[0])
    coef = cfg.coefficients()
    dev = models.device
    windows = clip_windows(F, cfg, models.max_frames)
    passes = Passes(models, timer, windows)
    if timer is not None:
        timer.bind(dev)

    if not ws.group_attrs(GROUP).get("settings"):
        ws.update_attrs(GROUP, status="running", model={"spec": cfg.model, "fingerprint": models.fingerprint},
                        prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, subject=cfg.subject,
                        region=cfg.region, stdg=list(coef), cfg=float(cfg.cfg), shared_null=bool(cfg.shared_null),
                        schedule=schedule.name, steps=S, timesteps=list(schedule.timesteps), prev=list(schedule.prev),
                        edit_timesteps=list(schedule.edit_timesteps), edit_prev=list(schedule.edit_prev),
                        config=config_dict(cfg), settings=settings, config_hash=config_hash(settings),
                        windows=windows.describe())

    c_src = encode_text(models, [cfg.prompt]).to(dev).expand(F, -1, -1)
    neg = encode_text(models, [cfg.negative_prompt]).to(dev)

    # ---- 1. VAE encode + DDIM inversion (cheap: S forwards; redone whole if it was interrupted)
    if ws.has(f"{GROUP}/latents"):
        latents = _tensor(ws.read(f"{GROUP}/latents"), dev)
    else:
        t0 = time.perf_counter()
        # standard strides everywhere (the VAE may hand back another memory format): CPU kernels round
        # differently per layout, and a resumed run reads plain contiguous arrays back from the store
        z0 = vae_encode(models, frames, seed=int(cfg.seed)).to(dev).contiguous()
        timings["encode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        traj = [z0]
        z = z0[None]
        with torch.no_grad(), progress.task("DDIM inversion", S) as advance:
            for k in range(S):
                j = S - 1 - k
                eps = passes.eps(z, schedule.timesteps[j], c_src)
                z = ddim.ddim_inverse_step(z, eps, schedule.prev[j], schedule.timesteps[j])
                traj.append(z[0])
                advance()
        latents = torch.stack(traj).contiguous()
        ws.write_array(f"{GROUP}/latents", latents.cpu().numpy())
        timings["ddim_inversion_s"] = time.perf_counter() - t0
    shape = tuple(latents.shape[1:])
    D = int(neg.shape[-1])

    arrays = {
        "recon": ws.create_array(f"{GROUP}/recon_latents", (S + 1,) + shape, "float32", (1,) + shape),
        "null": ws.create_array(f"{GROUP}/null_embeddings", (S, F, 77, D), "float32", (1, F, 77, D)),
        "guidance": ws.create_array(f"{GROUP}/stdg/guidance", (S,) + shape, "float32", (1,) + shape),
        "stats": ws.create_array(f"{GROUP}/step_stats", (S, len(STAT_COLUMNS)), "float64", (1, len(STAT_COLUMNS))),
        "done": ws.create_array(f"{GROUP}/done", (S + 1,), "bool", (1,)),
    }
    if cfg.store_components:
        arrays["components"] = ws.create_array(f"{GROUP}/stdg/components", (S, 4) + shape, "float32",
                                               (1, 4) + shape)
    done = arrays["done"][...]
    start = int(np.argmin(done[:S])) if not done[:S].all() else S
    if start == 0:
        arrays["recon"][S] = latents[S].cpu().numpy()
        z_t = latents[S][None].clone()
        phi = neg.repeat(1 if cfg.shared_null else F, 1, 1).float()
    else:
        z_t = _tensor(arrays["recon"][S - start], dev)[None]
        phi = _tensor(arrays["null"][start - 1], dev)
        phi = phi[:1].clone() if cfg.shared_null else phi
        if start < S:
            progress.log(f"resuming at step {start + 1}/{S}")

    stdg = None
    if any(coef) or cfg.store_components:
        if mask is None:
            raise InputError(f"workspace {ws.path} has no masks/edit; run `vd mask` first")
        fg = torch.from_numpy(mask.astype(bool)).to(dev)
        if windows.single:
            stdg = STDG(passes, controller, RegionMasks(fg, (shape[2], shape[3])), c_src, coef)
        else:  # temporal attention only exists inside a window: targets and losses per window
            stdg = [STDG(passes, controller, RegionMasks(fg[s:e], (shape[2], shape[3])), c_src[s:e], coef)
                    for s, e in windows.spans]

    # ---- 2. null-text optimisation with STDG, step by step, committed per step
    t0 = time.perf_counter()
    units = max(int(cfg.null_steps), 1)
    with progress.task("null-text + STDG", S * units, completed=start * units) as advance:
        for i in range(start, S):
            step_t0 = time.perf_counter()
            if timer is not None:
                timer.begin(i)
            before = passes.snapshot()
            z_t, phi, record = _step(i, schedule, latents, z_t, phi, cfg, coef, passes, stdg, c_src, advance, units)
            with passes.phase("commit"):
                _commit(ws, arrays, i, S, z_t, phi, record, F)
                after = passes.snapshot()
                arrays["stats"][i] = np.array([record["inner"], record["first_loss"], record["null_loss"],
                                               after[0] - before[0],
                                               after[1] - before[1], after[2] - before[2],
                                               time.perf_counter() - step_t0])
                arrays["done"][i] = True
            if timer is not None:
                timer.end()
            _test_delay()
    timings["null_text_s"] = time.perf_counter() - t0

    # ---- 3. report
    return _report(ws, cfg, progress, models, passes, schedule, latents, frames, mask, neg, c_src, arrays,
                   timings, t_begin, start)


def clip_windows(frames: int, cfg: InvertConfig, max_frames: int) -> Windows:
    """The clip's windows for this inversion (one window when it fits); refuses what cannot run."""
    if int(cfg.window) > max_frames:
        raise UsageError(f"--window {cfg.window} exceeds the motion module's maximum of {max_frames} frames")
    windows = plan_windows(frames, int(cfg.window), int(cfg.overlap))
    if cfg.plain and not windows.single:
        raise UsageError(f"--plain (the reference-cost baseline) runs one window; {frames} frames need "
                         f"--window >= {frames}")
    return windows


def _windowed_stdg(stdgs: list[STDG], windows: Windows, z_star: Any, z_t: Any, t: int, need: tuple[bool, bool],
                   components: tuple[str, ...]) -> tuple[Any, Any, list[Any], dict[str, float], dict[str, Any]]:
    """STDG window by window: (G, eps_c, per-window targets, mean losses, components), G, eps_c and the
    components blended with the windows' weights (each window's loss is its own)."""
    import torch

    G, eps_c = torch.zeros_like(z_t), torch.zeros_like(z_t)
    comps = {n: torch.zeros_like(z_t) for n in components}
    targets, losses = [], {}
    for k, (stdg, (s, e)) in enumerate(zip(stdgs, windows.spans)):
        tg = stdg.targets(z_star[:, s:e], t, need)
        g, ec, ls, cp = stdg.gradient(z_t[:, s:e], t, tg, components)
        w = weight_tensor(windows, k, g)
        G[:, s:e] += w * g
        eps_c[:, s:e] += w * ec
        for n in components:
            comps[n][:, s:e] += w * cp[n]
        targets.append(tg)
        for n, v in ls.items():
            losses[n] = losses.get(n, 0.0) + v / len(windows.spans)
    return G, eps_c, targets, losses, comps


def _null_text_backward_windowed(passes: Passes, z_t: Any, t: int, tp: int, phi: Any, eps_c: Any, G: Any,
                                 target: Any, scale: float) -> Any:
    """The null-text loss over all frames and its gradient in phi.grad, one window's graph at a time.

    A no-grad pass gives the blended eps_u and dL/d(eps_u) per frame; each window is then re-run with grad and
    back-propagated with its weight's share of that gradient (eps_u = sum_k w_k eps_k, so dL/d(eps_k) =
    w_k dL/d(eps_u)). Returns the loss (before the update).
    """
    import torch
    import torch.nn.functional as Fn

    from stages.method import ddim

    windows = passes.windows
    F = int(z_t.shape[1])
    with torch.no_grad():
        eps_u = passes.eps(z_t, t, _expand(phi.detach(), F))
    eps_u.requires_grad_(True)
    with torch.enable_grad():
        loss = Fn.mse_loss(ddim.ddim_step(z_t, ddim.cfg(eps_u, eps_c, scale), t, tp, guidance=G), target)
        (d_eps,) = torch.autograd.grad(loss, eps_u)
        phi.grad = None
        for k, (s, e) in enumerate(windows.spans):
            out = passes.eps_window(z_t[:, s:e], t, _expand(phi, F)[s:e])
            out.backward(d_eps[:, s:e] * weight_tensor(windows, k, out))
            passes.backwards += 1
    return loss.detach()


def _tensor(array: np.ndarray, device: Any) -> Any:
    """A torch-owned copy: numpy buffers can be aligned differently, and CPU kernels may then round
    differently, which would break "a resumed run equals an uninterrupted one"."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).clone().to(device)


def _expand(phi: Any, frames: int) -> Any:
    return phi.expand(frames, -1, -1) if phi.shape[0] == 1 else phi


def _step(i: int, schedule: Any, latents: Any, z_t: Any, phi_prev: Any, cfg: InvertConfig,
          coef: tuple[float, ...], passes: Passes, stdg: STDG | None, c_src: Any, advance: Any,
          units: int) -> tuple[Any, Any, dict[str, Any]]:
    """One null-text step i: returns (next latent, phi_i, record with G, components, targets, stats)."""
    import torch
    import torch.nn.functional as Fn

    from stages.method import ddim
    from stages.method.guidance import COMPONENTS, needs_terms

    S = schedule.steps
    t, tp = schedule.timesteps[i], schedule.prev[i]
    F = z_t.shape[1]
    z_star, target = latents[S - i][None], latents[S - 1 - i][None]
    record: dict[str, Any] = {"targets": None, "components": None}
    active = stdg is not None and any(coef) and (cfg.plain or (i > 0 and ddim.guidance_coefficient(t, tp) > 0))

    G = torch.zeros_like(z_t)
    eps_c = None
    if active and not cfg.plain:
        need = (True, True) if cfg.store_components else needs_terms(coef)
        wanted = COMPONENTS if cfg.store_components else ()
        if isinstance(stdg, list):
            G, eps_c, targets, losses, comps = _windowed_stdg(stdg, passes.windows, z_star, z_t, t, need, wanted)
        else:
            targets = stdg.targets(z_star, t, need)
            G, eps_c, losses, comps = stdg.gradient(z_t, t, targets, wanted)
        record.update(targets=targets, losses=losses, components=comps or None)
    elif active:  # plain: the reference's four independent components, each with its own GT forward
        comps = {}
        for name, c in zip(COMPONENTS, coef):
            targets = stdg.targets(z_star, t, truncate=False)
            _, _, losses, grad = stdg.gradient(z_t, t, targets, (name,), combined=False, cut=False)
            comps[name] = grad[name]
            _flush(passes)
        G = sum(c * comps[n] for n, c in zip(COMPONENTS, coef))
        record.update(targets=targets, components=comps if cfg.store_components else None)
    elif cfg.store_components:
        record["components"] = {n: torch.zeros_like(z_t) for n in COMPONENTS}
    if eps_c is None:
        with passes.phase("eps_c_forward"), torch.no_grad():
            eps_c = passes.eps(z_t, t, c_src)

    phi = phi_prev.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([phi], lr=BASE_LR * (1.0 - i / (2.0 * S)))
    threshold = EARLY_STOP + i * EARLY_STOP_SLOPE
    inner, first, last = 0, float("nan"), float("nan")
    windowed = passes.windows is not None and not passes.windows.single
    for _ in range(int(cfg.null_steps)):
        if windowed:
            with passes.phase("inner_windows"):
                loss = _null_text_backward_windowed(passes, z_t, t, tp, phi, eps_c, G, target, cfg.cfg)
        else:
            with passes.phase("inner_forward"):
                eps_u = passes.eps(z_t, t, _expand(phi, F))
                z_rec = ddim.ddim_step(z_t, ddim.cfg(eps_u, eps_c, cfg.cfg), t, tp, guidance=G)
                loss = Fn.mse_loss(z_rec, target)
            with passes.phase("inner_backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            passes.backwards += 1
        with passes.phase("adam_step"):
            opt.step()
            last = float(loss.detach())  # the early-stop rule needs the value every iteration
        inner += 1
        first = last if inner == 1 else first
        if not math.isfinite(last):
            raise FloatingPointError(f"null-text loss became {last} at step {i}")
        advance(1, step=f"{i + 1}/{S}", loss=last)
        if cfg.plain:
            del eps_u, z_rec, loss
            _flush(passes)
        if last < threshold:
            break
    if units - inner > 0:  # early stop: count the skipped iterations so the ETA stays honest
        advance(units - inner, step=f"{i + 1}/{S}")
    phi = phi.detach()
    with passes.phase("final_update"), torch.no_grad():
        if cfg.plain:  # the reference recomputes both halves in one batch-2 call
            both = passes.eps(torch.cat([z_t, z_t]), t, torch.cat([_expand(phi, F), c_src]))
            eps_u, eps_c = both[:1], both[1:]
        else:
            eps_u = passes.eps(z_t, t, _expand(phi, F))
        z_next = ddim.ddim_step(z_t, ddim.cfg(eps_u, eps_c, cfg.cfg), t, tp, guidance=G)
    record.update(G=G, inner=inner, first_loss=first, null_loss=last)
    return z_next, phi, record


def _flush(passes: Passes) -> None:
    """The reference's per-iteration gc.collect() (+ torch.cuda.empty_cache()); plain mode only."""
    import gc

    import torch

    with passes.phase("gc"):
        gc.collect()
        if passes.models.device.type == "cuda":
            torch.cuda.empty_cache()


def _step_array(ws: Workspace, arrays: dict[str, Any], name: str, S: int, shape: Any, dtype: str) -> Any:
    """The (S, *shape) per-step array `name`, opened (or created) once per run, not once per step."""
    if name not in arrays:
        shape = tuple(shape)
        arrays[name] = ws.create_array(name, (S,) + shape, dtype, (1,) + shape)
    return arrays[name]


def _commit(ws: Workspace, arrays: dict[str, Any], i: int, S: int, z_next: Any, phi: Any,
            record: dict[str, Any], F: int) -> None:
    """Write step i's data (the done flag is set by the caller afterwards)."""
    from stages.method.guidance import COMPONENTS

    targets = record.get("targets")
    # one window: inversion/targets/...; several: inversion/targets/w<k>/... (maps exist per window)
    per_window = targets if isinstance(targets, list) else [targets] if targets is not None else []
    for k, targets in enumerate(per_window):
        root = f"{GROUP}/targets/w{k}" if isinstance(record.get("targets"), list) else f"{GROUP}/targets"
        for name, (value, index) in targets.temporal.items():
            base = f"{root}/temporal/{name}"
            _step_array(ws, arrays, f"{base}/value", S, value.shape, "float16")[i] = \
                value.cpu().numpy().astype(np.float16)
            _step_array(ws, arrays, f"{base}/index", S, index.shape, "uint8")[i] = \
                index.cpu().numpy().astype(np.uint8)
        for name, keys in targets.keys.items():
            _step_array(ws, arrays, f"{root}/keys/{name}", S, keys.shape, "float32")[i] = \
                keys.cpu().numpy().astype(np.float32)
    arrays["guidance"][i] = record["G"][0].float().cpu().numpy()
    if "components" in arrays and record.get("components") is not None:
        comps = record["components"]
        arrays["components"][i] = np.stack([comps[n][0].float().cpu().numpy() for n in COMPONENTS])
    arrays["null"][i] = _expand(phi, F).float().cpu().numpy()
    arrays["recon"][S - 1 - i] = z_next[0].float().cpu().numpy()


def _video_psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    from stages.quality.metrics import psnr

    f, h, w, c = a.shape
    reg = None if region is None else region.reshape(f * h, w).astype(bool)
    return psnr(a.reshape(f * h, w, c), b.reshape(f * h, w, c), reg)


def _report(ws: Workspace, cfg: InvertConfig, progress: Progress, models: Any, passes: Passes, schedule: Any,
            latents: Any, frames: np.ndarray, mask: np.ndarray | None, neg: Any, c_src: Any,
            arrays: dict[str, Any], timings: dict[str, float], t_begin: float, start: int) -> dict[str, Any]:
    import torch

    from stages.method import ddim
    from stages.models.load import vae_decode

    S, F = schedule.steps, int(frames.shape[0])
    t0 = time.perf_counter()
    stored = ws.group_attrs(GROUP)
    recon = dict(stored.get("recon") or {})
    final = torch.from_numpy(arrays["recon"][0]).to(models.device)
    if not bool(arrays["done"][S]):
        progress.log("decoding the reconstruction ...")
        rec = vae_decode(models, final)
        ws.write_array(f"{GROUP}/reconstruction", rec)
        vae_rec = vae_decode(models, latents[0])
        region = None if mask is None else mask.astype(bool)
        recon = {"latent_mse": float(((final - latents[0]) ** 2).mean()),
                 "psnr": _video_psnr(rec, frames), "vae_psnr": _video_psnr(vae_rec, frames)}
        if region is not None:
            recon.update(psnr_fg=_video_psnr(rec, frames, region), psnr_bg=_video_psnr(rec, frames, ~region))
        _write_videos(ws, frames, rec)
    if cfg.compare_ddim and "ddim_psnr" not in recon:
        progress.log("plain DDIM reconstruction for comparison ...")
        z = latents[S][None]
        with torch.no_grad():
            for i in range(S):
                t, tp = schedule.timesteps[i], schedule.prev[i]
                both = passes.eps(torch.cat([z, z]), t, torch.cat([neg.expand(F, -1, -1), c_src]))
                z = ddim.ddim_step(z, ddim.cfg(both[:1], both[1:], cfg.cfg), t, tp)
        ddim_rec = vae_decode(models, z[0])
        recon.update(ddim_latent_mse=float(((z[0] - latents[0]) ** 2).mean()),
                     ddim_psnr=_video_psnr(ddim_rec, frames))
    timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_begin

    stats = arrays["stats"][...]
    per_step = [{"step": i, **{c: (float(stats[i, k]) if c in FLOAT_STATS else int(stats[i, k]))
                               for k, c in enumerate(STAT_COLUMNS)}} for i in range(S)]
    col = {c: k for k, c in enumerate(STAT_COLUMNS)}
    counts = {"this_run": {"unet_forwards": passes.forwards, "unet_gt_forwards": passes.gt_forwards,
                           "backwards": passes.backwards},
              "null_text_total": {"unet_forwards": int(stats[:, col["forwards"]].sum()),
                                  "unet_gt_forwards": int(stats[:, col["gt_forwards"]].sum()),
                                  "backwards": int(stats[:, col["backwards"]].sum())},
              "ddim_inversion_forwards": S}
    summary = {
        "workspace": str(ws.path), "status": "done", "steps": S, "frames": F, "resumed_from": start,
        "model": {"spec": cfg.model, "fingerprint": models.fingerprint, "device": str(models.device),
                  "dtype": str(models.dtype).removeprefix("torch.")},
        "prompt": cfg.prompt, "region": cfg.region, "stdg": list(cfg.coefficients()), "cfg": cfg.cfg,
        "schedule": schedule.name, "plain": cfg.plain, "recon": recon, "timings": timings, "counts": counts,
        "inner_iterations": [p["inner"] for p in per_step], "per_step": per_step,
        "outputs": {k: str(ws.file_path(f"{GROUP}/{k}")) for k in ("reconstruction.mp4", "preview.gif")},
    }
    ws.update_attrs(GROUP, status="done", subject=cfg.subject, recon=recon, timings=timings, counts=counts,
                    summary=summary)
    arrays["done"][S] = True
    return summary


def _write_videos(ws: Workspace, frames: np.ndarray, rec: np.ndarray) -> None:
    from stages.io.video import side_by_side, write_gif, write_mp4

    fps = float((ws.attrs.get("source") or {}).get("fps_out") or 8.0)
    write_mp4(ws.file_path(f"{GROUP}/reconstruction.mp4"), rec, fps)
    write_gif(ws.file_path(f"{GROUP}/preview.gif"), side_by_side(frames, rec, labels=["source", "reconstruction"]), fps)

