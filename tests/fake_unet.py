"""Test helpers: UNet stand-ins that keep the real `vd invert` / `vd edit` code paths around them.

The tiny random model has near-uniform attention, so it cannot show *where* an attention edit acts; these
stand-ins replace only `stages.models.ops.unet_eps` (text encoder, tokenizer, VAE, workspace, the stage loops,
the attention handlers, CFG and DDIM stay real) with functions whose outputs a test can write down by hand.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

import stages.method.control.editing as editing
import stages.edit.sampling
import stages.models.ops
from stages.method.control.controller import module_kind

SOURCE = "A brown bear, walking on rocky terrain, next to a stone wall."

# ᾱ_t of AnimateDiff's linear betas, written from the formula (ALGORITHM.md §1.5), not from stages.method.ddim
ALPHA_BAR = np.cumprod(1.0 - np.linspace(0.00085, 0.012, 1000, dtype=np.float64))


def abar(t: int) -> float:
    """ᾱ_t, and 1.0 for t < 0 (set_alpha_to_one)."""
    return 1.0 if t < 0 else float(ALPHA_BAR[t])


def hand_ddim(z: torch.Tensor, eps: torch.Tensor, t: int, tp: int, g: torch.Tensor | None = None) -> torch.Tensor:
    """ALGORITHM.md §3.6 written out: x0 from the un-guided eps, G (scale 1) only in the direction term."""
    a_t, a_p = abar(t), abar(tp)
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    direction = eps if g is None else eps - (1 - a_t) ** 0.5 * g
    return a_p**0.5 * x0 + (1 - a_p) ** 0.5 * direction


def fake_invert_eps(models: Any, z: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    """eps = z/2 + t/1000 + (per frame mean of its text embedding): differentiable in the null text."""
    b, f = z.shape[:2]
    return 0.5 * z + 1e-3 * t + emb.float().mean(dim=(1, 2)).view(b, f, 1, 1, 1)


def fake_inversion(models: Any, steps: int, frames: int, hw: tuple[int, int], schedule: str = "vd",
                   seed: int = 0, guidance_scale: float = 0.0) -> Any:
    """A finished-inversion object for edit_latents without running the inversion: a forward-noised
    source path latents[k] = sqrt(ᾱ) z0 + sqrt(1-ᾱ) n at the schedule's timesteps, phi_i = the empty-prompt
    embedding plus i/100, and G_i = guidance_scale * (i + 1) * a fixed random field."""
    from stages.method.ddim import make_schedule
    from stages.invert import Inversion

    sched = make_schedule(schedule, steps)
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(frames, 4, *hw, generator=gen)
    noise = torch.randn(frames, 4, *hw, generator=gen)
    lat = [z0] + [abar(sched.timesteps[steps - k]) ** 0.5 * z0 + (1 - abar(sched.timesteps[steps - k])) ** 0.5 * noise
                  for k in range(1, steps + 1)]
    neg = stages.models.ops.encode_text(models, [""])[0]
    null = torch.stack([neg.expand(frames, -1, -1) + i / 100 for i in range(steps)])
    field = torch.randn(frames, 4, *hw, generator=gen)
    guidance = torch.stack([guidance_scale * (i + 1) * field for i in range(steps)])
    return Inversion(schedule=sched, latents=torch.stack(lat).numpy(), null_embeddings=null.numpy(),
                     guidance=guidance.numpy(), prompt=SOURCE, negative_prompt="", subject="brown bear",
                     region="foreground", cfg=7.5, shared_null=False,
                     model={"spec": "tiny", "fingerprint": models.fingerprint}, attrs={"noise": noise})


def local_qk(n: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4) query and key codes of a square token grid with q_p . k_r = -scale |p - r|^2: attention to
    the nearest key position (a stand-in for a trained model's spatially matching self-attention)."""
    side = int(round(n**0.5))
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    x, y = xx.reshape(-1).float(), yy.reshape(-1).float()
    q = torch.stack([2 * x, 2 * y, -(x * x + y * y), torch.ones(n)], dim=1)
    k = torch.stack([x, y, torch.ones(n), -(x * x + y * y)], dim=1)
    return q * scale * 2.0, k  # SDPA divides by sqrt(d) = 2


class FakeEditUNet:
    """Replaces unet_eps during edit_latents and records what the real attention handlers do per step.

    mode "probe": every installed handler is called once per step on random q/k/v (8x8 tokens, 77 text
    tokens); eps of slot b = z/2 + t/1000 + SLOT[b].
    mode "local": eps of slot b = the output of the real handler of ONE SA-II layer applied with nearest-
    position q/k codes to values v_b = `noise` (+ `push` on the edit-cond slot): `noise` is the noise of the
    forward-noised source path (fake_inversion), so a slot whose output is `noise` follows that path
    exactly; the push stands for the target prompt's new content.
    """

    SLOT = (0.1, 0.3, 0.7, 1.1)

    def __init__(self, monkeypatch: Any, mode: str = "probe", noise: torch.Tensor | None = None,
                 push: float = 0.0, scale: float = 20.0):
        self.mode, self.noise, self.push, self.scale = mode, noise, push, scale
        self.controller: Any = None
        self.steps_of: dict[str, set[int]] = defaultdict(set)
        self.hides: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.inputs: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (t, z, emb) per call
        self.gen = torch.Generator().manual_seed(1)
        real_install = stages.edit.sampling.install

        def spy_install(unet: Any, controller: Any) -> Any:
            self.controller = real_install(unet, controller)
            return self.controller

        monkeypatch.setattr(stages.edit.sampling, "install", spy_install)
        monkeypatch.setattr(stages.models.ops, "unet_eps", self)
        for name in ("sa1_attention", "sa2_attention", "p2p_maps"):
            monkeypatch.setattr(editing, name, self._recording(name, getattr(editing, name)))

    def _recording(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            step = self.controller.step
            self.steps_of[name].add(step)
            if name == "sa2_attention":
                self.hides[step].append(args[3].clone())
            return fn(*args, **kwargs)

        return wrapped

    def __call__(self, models: Any, z: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
        self.inputs.append((t, z.clone(), emb.clone()))
        b, f, c, h, w = z.shape
        assert b == 4, "edit runs one batch of four slots"
        if self.mode == "probe":
            for name, handler in list(self.controller.handlers.items()):
                kv = 77 if module_kind(name) == "cross" else h * w
                q = torch.randn(4 * f, 1, h * w, 8, generator=self.gen)
                k = torch.randn(4 * f, 1, kv, 8, generator=self.gen)
                v = torch.randn(4 * f, 1, kv, 8, generator=self.gen)
                out = handler(name, None, q, k, v)
                assert out.shape == q.shape
            slot = torch.tensor(self.SLOT).view(4, 1, 1, 1, 1)
            return 0.5 * z + 1e-3 * t + slot
        name = next(n for n in self.controller.names if n in self.controller.handlers and module_kind(n) == "self"
                    and editing.in_blocks(n, editing.SA2_BLOCKS))
        q1, k1 = local_qk(h * w, self.scale)
        assert self.noise is not None
        push = torch.tensor([0.0, self.push, 0.0, 0.0]).view(4, 1, 1, 1, 1)
        values = (self.noise[None] + push).reshape(4 * f, c, h * w).transpose(1, 2)[:, None]  # (4F, 1, N, 4)
        q = q1.expand(4 * f, 1, -1, -1).contiguous()
        k = k1.expand(4 * f, 1, -1, -1).contiguous()
        out = self.controller.handlers[name](name, None, q, k, values.contiguous())
        return out[:, 0].transpose(1, 2).reshape(b, f, c, h, w)
