"""Fast inversion methods beside multi-frame null text (`vd invert --method`, ALGORITHM.md §13.1-§13.2).

direct (Ju et al., ICLR 2024): after the DDIM inversion, one pass over the sampling steps. Step i takes the
stored z*_t (t = edit_timesteps[i], the grid `vd edit` samples on), predicts eps with CFG from the plain
unconditional embedding (the negative prompt's) and the source prompt, takes the DDIM step and stores the
offset d_i = z*_{t_prev} - step(z*_t) in inversion/direct_offsets; the reconstruction continues from
z*_{t_prev}, so it is the inversion path itself up to float rounding. No optimisation and no STDG gradient
(G_i = 0: the reconstruction already is the path STDG pulls toward); the STDG targets are recorded from the
step's conditional forward, the same statistics the null-text path's GT pass records. `vd edit` adds d_i to
its source branch only (stages/edit/offsets.py).

negative-prompt (Miyake et al.): the null embedding of every step is the source prompt's; the step is the
null-text step (nulltext._step, STDG included) without Adam iterations, stored as null_embeddings, so
`vd edit` reads it like any null text.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from stages.common.progress import Progress
from stages.invert.config import GROUP, STAT_COLUMNS, InvertConfig
from stages.invert.passes import Passes, PhaseTimer
from stages.invert.stdg import STDG
from stages.invert.store import _commit
from stages.io.workspace import Workspace

OFFSETS = f"{GROUP}/direct_offsets"


def step_config(cfg: InvertConfig) -> InvertConfig:
    """The config the per-step loop runs with: negative-prompt is the null-text step with no Adam iteration."""
    return dataclasses.replace(cfg, null_steps=0) if cfg.method == "negative-prompt" else cfg


def initial_null(cfg: InvertConfig, neg: Any, c_src: Any) -> Any:
    """phi before step 0 for the negative-prompt method: the source prompt's embedding (per frame unless
    shared_null). Null text starts from the negative prompt instead (run.py)."""
    frames = int(c_src.shape[0])
    return c_src[:1].repeat(1 if cfg.shared_null else frames, 1, 1).float()


def offset_step(z_star: Any, target: Any, eps_u: Any, eps_c: Any, scale: float, t: int,
                t_prev: int) -> tuple[Any, Any]:
    """One direct step: (offset d = target - step(z*_t), reconstruction step(z*_t) + d).

    step is the plain CFG DDIM step eps_c + scale (eps_c - eps_u), without STDG; target is z*_{t_prev}.
    """
    from stages.method import ddim

    z_hat = ddim.ddim_step(z_star, ddim.cfg(eps_u, eps_c, scale), t, t_prev)
    offset = target - z_hat
    return offset, z_hat + offset


def _record(stdg: STDG, forward: Callable[[], Any], need: tuple[bool, bool]) -> tuple[Any, Any]:
    """Run `forward` (UNet(z*_t, t, c_src)) with STDG's recorders on: (eps, Targets). The statistics are those
    of STDG.targets' truncated GT pass (same layers, same reducers), here taken from a full forward."""
    from stages.method.control.record import Recorder
    from stages.method.guidance import Targets

    on_t, on_k = stdg._reducers(None)
    rec = Recorder(stdg.controller, stdg.temporal, stdg.spatial, on_t if need[0] else None,
                   on_k if need[1] else None)
    with rec:
        eps = forward()
    if not rec.complete:
        raise RuntimeError("the conditional pass did not reach every STDG layer")
    return eps, Targets(temporal={n: rec.results[n] for n in rec.temporal},
                        keys={n: rec.results[n] for n in rec.spatial})


def _cond_with_targets(passes: Passes, stdg: STDG | list[STDG], z_star: Any, t: int, c_src: Any,
                       need: tuple[bool, bool]) -> tuple[Any, Any]:
    """eps_c and the STDG targets (one Targets, or one per window) from the same conditional forward."""
    from stages.method.windows import blend

    if not isinstance(stdg, list):
        return _record(stdg, lambda: passes.eps(z_star, t, c_src), need)
    windows = passes.windows
    targets: dict[int, Any] = {}

    def window(s: int, e: int) -> Any:
        k = windows.spans.index((s, e))
        eps, targets[k] = _record(stdg[k], lambda: passes.eps_window(z_star[:, s:e], t, stdg[k].c_src), need)
        return eps

    eps = blend(windows, window)
    return eps, [targets[k] for k in range(len(windows.spans))]


def run_direct(ws: Workspace, cfg: InvertConfig, progress: Progress, schedule: Any, latents: Any, neg: Any,
               c_src: Any, passes: Passes, stdg: STDG | list[STDG] | None, arrays: dict[str, Any], start: int,
               timer: PhaseTimer | None = None, after_step: Callable[[], None] | None = None) -> None:
    """The direct inversion's steps start..S-1, each committed (offset, reconstruction, targets, done flag).

    latents: the DDIM trajectory (S+1, F, 4, h, w); neg: (1, 77, D) the plain unconditional embedding;
    c_src: (F, 77, D). Stored per step like the null-text path (null_embeddings = neg, guidance = 0).
    """
    import torch

    from stages.method import ddim
    from stages.method.guidance import COMPONENTS, needs_terms

    S, F = schedule.steps, int(latents.shape[1])
    shape = tuple(latents.shape[1:])
    offsets = ws.create_array(OFFSETS, (S,) + shape, "float32", (1,) + shape)
    coef = cfg.coefficients()
    need = (True, True) if cfg.store_components else needs_terms(coef)
    null = neg.expand(F, -1, -1)
    with progress.task("direct inversion", S, completed=start) as advance:
        for i in range(start, S):
            step_t0 = time.perf_counter()
            if timer is not None:
                timer.begin(i)
            before = passes.snapshot()
            t, tp = schedule.edit_timesteps[i], schedule.edit_prev[i]
            z_star, target = latents[S - i][None], latents[S - 1 - i][None]
            # targets where the null-text path records them (nulltext._step's rule), at its timestep
            t_gt = schedule.timesteps[i]
            active = stdg is not None and any(coef) and i > 0 and ddim.guidance_coefficient(t_gt, schedule.prev[i]) > 0
            targets = None
            with torch.no_grad():
                with passes.phase("uncond_forward"):
                    eps_u = passes.eps(z_star, t, null)
                with passes.phase("cond_forward"):
                    if active and t_gt == t:  # one forward gives eps_c and the targets
                        eps_c, targets = _cond_with_targets(passes, stdg, z_star, t, c_src, need)
                    else:
                        eps_c = passes.eps(z_star, t, c_src)
                if active and targets is None:  # --schedule reference: the targets are at another timestep
                    with passes.phase("gt_forward"):
                        targets = ([s.targets(z_star[:, a:b], t_gt, need) for s, (a, b) in
                                    zip(stdg, passes.windows.spans)] if isinstance(stdg, list)
                                   else stdg.targets(z_star, t_gt, need))
                offset, recon = offset_step(z_star, target, eps_u, eps_c, float(cfg.cfg), t, tp)
            zeros = torch.zeros_like(z_star)
            record = {"targets": targets, "G": zeros,
                      "components": {n: zeros for n in COMPONENTS} if cfg.store_components else None}
            with passes.phase("commit"):
                offsets[i] = offset[0].float().cpu().numpy()
                _commit(ws, arrays, i, S, recon, neg, record, F)
                after = passes.snapshot()
                row = {"inner": 0,
                       "first_loss": float((offset ** 2).mean()),  # the plain step's miss (null text's first loss)
                       "null_loss": float(((recon - target) ** 2).mean()),  # after the offset: rounding only
                       "forwards": after[0] - before[0], "gt_forwards": after[1] - before[1],
                       "backwards": after[2] - before[2], "seconds": time.perf_counter() - step_t0}
                arrays["stats"][i] = np.array([row[c] for c in STAT_COLUMNS], dtype=np.float64)
                arrays["done"][i] = True
            if timer is not None:
                timer.end()
            advance(1, step=f"{i + 1}/{S}")
            if after_step is not None:
                after_step()
