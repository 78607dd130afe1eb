"""Stage `vd invert`: DDIM inversion + multi-frame null-text optimisation with STDG (ALGORITHM.md §1.3-§4).

Per sampling step i (t = schedule.timesteps[i], t_prev = schedule.prev[i]), optimised mode:
1. GT pass UNet(z*_t, t, c_src), no grad, stopped after the last STDG layer, reduced to compact targets;
2. one grad pass UNet(z_t, t, c_src) with z_t.requires_grad, decoder after up_blocks.2 detached; ONE backward
   of the coefficient-weighted loss gives G_i; its output (detached) is eps_c;
3. null-text: Adam on phi (F or 1, 77, D) float32, up to null_steps iterations (1 forward + 1 backward each);
4. z_t <- ddim_step(z_t, cfg(eps_u(phi_i), eps_c), G_i): one forward (only eps_u is recomputed).
STDG is skipped at i = 0 (z_t == z*_T, so G == 0 exactly) and where its coefficient sqrt(1-a_prev)sqrt(1-a_t)
is 0 (the last step); G is stored as zeros there. Plain mode (`plain=True`, the benchmark baseline, see
baseline.py) does it as the reference code and pays what it pays. Same results up to floating-point rounding.
A PhaseTimer passed to run_invert records seconds per phase of every step (bench.py --profile).
What is stored in the workspace: store.py.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from stages.common.errors import InputError, Interrupted, UsageError
from stages.common.progress import Progress
from stages.invert import checkpointing
from stages.invert.baseline import _reference_costs
from stages.invert.config import GROUP, InvertConfig, validate
from stages.invert.direct import initial_null, run_direct, step_config
from stages.invert.nulltext import _step, _tensor
from stages.invert.passes import Passes, PhaseTimer, clip_windows
from stages.invert.plan import oom_plan
from stages.invert.report import _report
from stages.invert.stdg import STDG
from stages.invert.store import (_begin, _commit, _incomplete, _open_arrays, _refuse_changes, _require_inputs,
                                 _summary_from_attrs, model_identity, relabel, stored_settings)
from stages.io import locks as stagelock
from stages.io.workspace import Workspace
from stages.method.windows import MAX_WINDOW
from stages.models.oom import oom_answered


@stagelock.scoped
@oom_answered(oom_plan)
def run_invert(ws: Workspace, cfg: InvertConfig, progress: Progress, models: Any | None = None,
               timer: PhaseTimer | None = None) -> dict[str, Any]:
    """Invert the workspace clip (resumable); returns a JSON-friendly summary (see store.py for what is stored).

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
    stored = ws.group_attrs(GROUP)
    resuming = bool(stored.get("settings")) and not cfg.restart
    # the model by content, before anything is declared complete (found from its files when not loaded)
    settings = stored_settings(cfg, frames, mask, model_identity(cfg, models) if resuming else None)
    if resuming:  # the rule is_current() reports
        _refuse_changes(stored, settings, ws, cfg.model)
        stored = relabel(ws, cfg, stored, progress)  # subject, model path: labels, nothing to recompute
        if not _incomplete(ws, cfg, stored):
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
        _refuse_changes(stored, settings, ws, cfg.model)
    else:
        ws.remove(GROUP)
    controller = install(models.unet, AttentionController())
    try:
        with _reference_costs(models, controller, cfg.plain), \
                checkpointing.applied(ws, GROUP, cfg, models, controller, *frames.shape[:3]):
            return _run(ws, cfg, progress, models, controller, frames, mask, settings, timings, t_begin, timer)
    except KeyboardInterrupt:
        done = ws.read(f"{GROUP}/done") if ws.has(f"{GROUP}/done") else np.zeros(1, bool)
        kept = int(done[: int(cfg.steps)].sum())
        raise Interrupted(f"interrupted; {kept} of {cfg.steps} {cfg.method} steps are saved in {ws.path}, "
                          f"rerun the same command to resume") from None
    finally:
        controller.clear()


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
    from stages.models.ops import encode_text, vae_encode

    schedule = ddim.make_schedule(cfg.schedule, int(cfg.steps))
    S, F = schedule.steps, int(frames.shape[0])
    coef = cfg.coefficients()
    dev = models.device
    windows = clip_windows(F, cfg, models.max_frames)
    passes = Passes(models, timer, windows)
    if timer is not None:
        timer.bind(dev)
    _begin(ws, cfg, models, schedule, coef, settings, windows)

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

    arrays = _open_arrays(ws, S, F, D, shape, cfg.store_components)
    done = arrays["done"][...]
    start = int(np.argmin(done[:S])) if not done[:S].all() else S
    if start == 0:
        arrays["recon"][S] = latents[S].cpu().numpy()
        z_t = latents[S][None].clone()
        phi = neg.repeat(1 if cfg.shared_null else F, 1, 1).float()
        if cfg.method == "negative-prompt":
            phi = initial_null(cfg, neg, c_src)
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

    if cfg.method == "direct":  # one pass over the steps, no optimisation (direct.py)
        t0 = time.perf_counter()
        run_direct(ws, cfg, progress, schedule, latents, neg, c_src, passes, stdg, arrays, start, timer, _test_delay)
        timings["direct_s"] = time.perf_counter() - t0
        return _report(ws, cfg, progress, models, passes, schedule, latents, frames, mask, neg, c_src, arrays,
                       timings, t_begin, start)

    # ---- 2. null-text optimisation with STDG, step by step, committed per step
    t0 = time.perf_counter()
    step_cfg = step_config(cfg)  # negative-prompt: the same step without Adam iterations (direct.py)
    units = max(int(step_cfg.null_steps), 1)
    with progress.task("null-text + STDG", S * units, completed=start * units) as advance:
        for i in range(start, S):
            step_t0 = time.perf_counter()
            if timer is not None:
                timer.begin(i)
            before = passes.snapshot()
            z_t, phi, record = _step(i, schedule, latents, z_t, phi, step_cfg, coef, passes, stdg, c_src, advance,
                                     units)
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
