"""The null-text step of the inversion (ALGORITHM.md §4): STDG gradient, Adam on phi, the DDIM update."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stages.invert.baseline import _flush
from stages.invert.config import BASE_LR, EARLY_STOP, EARLY_STOP_SLOPE, InvertConfig
from stages.invert.passes import Passes
from stages.invert.stdg import STDG, _windowed_stdg
from stages.method.windows import weight_tensor


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
