"""`vd edit` from a direct inversion (ALGORITHM.md §13.1): the source branch, corrected by the stored offsets.

The recon slots of the edit batch (2: uncond, see `recon_uncond`; 3: source prompt) normally get the stored inversion
latents z*_t. From a `direct` inversion they get a source branch instead: it starts at z*_T, and after each
step takes the CFG DDIM step from its own two slots' predictions and adds the stored offset d_i, which puts it
on z*_{t_prev} up to float rounding (the offsets were computed from z*_t on the same grid and the same
embeddings, stages/invert/direct.py). The attention maps P2P and SA-I/SA-II take from it are therefore the
inversion path's. The target (edit) branch never gets the offsets. No STDG on the source branch (its G is 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stages.common.errors import InputError
from stages.method.ddim import cfg as cfg_combine, ddim_step

if TYPE_CHECKING:
    from stages.invert import Inversion


class SourceBranch:
    """The edit's source branch of a direct inversion: `latent` (F, 4, h, w) feeds the recon slots of step i."""

    def __init__(self, inv: Inversion, device: Any):
        assert inv.offsets is not None
        self.offsets = inv.offsets
        self.scale = float(inv.cfg)
        self.latent = torch.from_numpy(np.asarray(inv.latents[inv.steps], dtype=np.float32)).to(device)

    def step(self, i: int, eps_uncond: torch.Tensor, eps_cond: torch.Tensor, t: int, t_prev: int) -> None:
        """Advance past step i: CFG DDIM step from the recon slots' predictions, plus the stored offset d_i."""
        offset = torch.from_numpy(np.asarray(self.offsets[i], dtype=np.float32)).to(self.latent.device)
        self.latent = ddim_step(self.latent, cfg_combine(eps_uncond, eps_cond, self.scale), t, t_prev) + offset


def recon_uncond(inv: Inversion, phi: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The text embedding of the recon-uncond slot (2) for the frames of `phi` (the step's stored null
    embeddings of a window, (n, 77, D)); `neg` is the negative prompt's (77, D).

    negative-prompt: phi itself (= the source prompt's embedding), as PnP's NPI+P2P gives both rows the
    same unconditional embedding. The inversion path was made with uncond = c_src, so with it the recon
    branch's CFG prediction is eps_c + w (eps_c - eps_c) = eps_c, the inversion's own; the negative prompt
    would make it eps_c + w (eps_c - eps_neg), a prediction off that path.
    direct: the negative prompt, which its offsets were computed with (the source branch only lands on z*
    with it; phi is the same embedding there). null-text: the negative prompt, not phi (ALGORITHM.md §5.1).
    """
    if inv.method == "negative-prompt":
        return phi
    return neg.expand(phi.shape[0], -1, -1)


def source_branch(inv: Inversion, device: Any) -> SourceBranch | None:
    """The corrected source branch for a direct inversion; None (use the stored z*) for the other methods."""
    return SourceBranch(inv, device) if inv.method == "direct" else None


def check_offsets(inv: Inversion, path: Any) -> None:
    """InputError when a direct inversion's offsets are missing or do not fit its latents."""
    if inv.method != "direct":
        return
    want = (inv.steps,) + tuple(inv.latents.shape[1:])
    if inv.offsets is None or tuple(inv.offsets.shape) != want:
        got = None if inv.offsets is None else list(inv.offsets.shape)
        raise InputError(f"the direct inversion in {path} has offsets of shape {got}, expected {list(want)}; "
                         f"re-invert with `vd invert {path} --method direct --restart`")
