"""DDIM on AnimateDiff's linear beta schedule: timestep grids, step, inverse step, CFG. Pure tensor math.

Two schedules (ALGORITHM.md, decision 1):
- "vd" (default): one grid, round(linspace(0, 999, S)) descending, for inversion, null-text optimisation
  and editing; every step goes to the grid's true previous timestep.
- "reference": the reference code's behaviour, number for number: inversion/null-text on the linspace
  grid, editing on diffusers' "leading" grid (981, 961, ..., 1), and every step to t - 1000 // S.
A previous timestep < 0 means alpha_bar = 1 (the clean image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
SCHEDULES = ("vd", "reference")


def alphas_cumprod() -> np.ndarray:
    """alpha_bar_t for t = 0..999 with AnimateDiff's *linear* betas (not SD's scaled_linear)."""
    betas = np.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=np.float64)
    return np.cumprod(1.0 - betas)


_ALPHAS = alphas_cumprod()


def alpha_bar(t: int) -> float:
    """alpha_bar at integer timestep t; 1.0 for t < 0 (set_alpha_to_one)."""
    return 1.0 if t < 0 else float(_ALPHAS[t])


@dataclass(frozen=True)
class Schedule:
    """Timesteps for the sampling direction (descending) and each step's previous timestep.

    `timesteps[i]` / `prev[i]` drive inversion and null-text step i; `edit_timesteps[i]` / `edit_prev[i]`
    drive editing step i. Inversion visits the pairs in reverse: from prev[i] up to timesteps[i].
    """

    name: str
    timesteps: tuple[int, ...]
    prev: tuple[int, ...]
    edit_timesteps: tuple[int, ...]
    edit_prev: tuple[int, ...]

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def linspace_grid(steps: int) -> list[int]:
    """round(linspace(0, 999, steps)) in descending order (999, 979, 958, ... 0 for 50 steps)."""
    return [int(t) for t in np.round(np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps))[::-1]]


def leading_grid(steps: int) -> list[int]:
    """diffusers' "leading" spacing with steps_offset 1 (981, 961, ..., 1 for 50 steps)."""
    ratio = NUM_TRAIN_TIMESTEPS // steps
    return [int(t) for t in (np.arange(steps) * ratio + 1)[::-1]]


def make_schedule(name: str = "vd", steps: int = 50) -> Schedule:
    """Build the timestep schedule `name` ("vd" or "reference") with `steps` DDIM steps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    if not 2 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be in 2..{NUM_TRAIN_TIMESTEPS}, got {steps}")
    grid = linspace_grid(steps)
    if name == "vd":
        prev = grid[1:] + [-1]
        return Schedule(name, tuple(grid), tuple(prev), tuple(grid), tuple(prev))
    ratio = NUM_TRAIN_TIMESTEPS // steps
    edit = leading_grid(steps)
    return Schedule(name, tuple(grid), tuple(t - ratio for t in grid), tuple(edit), tuple(t - ratio for t in edit))


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in the reference's form eps_c + w (eps_c - eps_u).

    w = 7.5 here equals diffusers' eps_u + s (eps_c - eps_u) with s = w + 1 = 8.5.
    """
    return eps_cond + scale * (eps_cond - eps_uncond)


def predict_x0(z: torch.Tensor, eps: torch.Tensor, a_t: float) -> torch.Tensor:
    """x0 estimate from the latent at alpha_bar a_t and its noise prediction."""
    return (z - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5


def ddim_step(z: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
              guidance: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """One deterministic (eta = 0) DDIM step t -> t_prev.

    With STDG `guidance` G (ALGORITHM.md §3.6) x0 uses the un-guided eps and only the direction term
    uses eps - s * sqrt(1 - a_t) * G.
    """
    a_t, a_prev = alpha_bar(t), alpha_bar(t_prev)
    x0 = predict_x0(z, eps, a_t)
    direction = eps if guidance is None else eps - guidance_scale * (1.0 - a_t) ** 0.5 * guidance
    return a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * direction


def ddim_inverse_step(z: torch.Tensor, eps: torch.Tensor, t_prev: int, t: int) -> torch.Tensor:
    """One DDIM inversion step t_prev -> t using eps predicted at timestep t (ALGORITHM.md §1.7)."""
    a_cur, a_next = alpha_bar(t_prev), alpha_bar(t)
    x0 = predict_x0(z, eps, a_cur)
    return a_next**0.5 * x0 + (1.0 - a_next) ** 0.5 * eps


def guidance_coefficient(t: int, t_prev: int) -> float:
    """Net factor on G in ddim_step: sqrt(1 - a_prev) * sqrt(1 - a_t) (0 at the last step)."""
    return (1.0 - alpha_bar(t_prev)) ** 0.5 * (1.0 - alpha_bar(t)) ** 0.5
