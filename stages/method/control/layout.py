"""Attention pieces of per-region edits (`vd edit --region`, notes/readme-regions.md).

Layout (cross-attention, edit-cond slot, steps < layout steps): region r's target-phrase tokens P_r get a
pre-softmax bias at query n of frame f
    bias[f, n, j] = +s_r(f) if n lies in object r's mask, else -s_r(f)     (j in P_r; 0 for other tokens)
    s_r(f) = lambda * (1 - a_r(f)) * t / 1000
with a_r(f) the mask's area fraction in frame f at that layer's resolution and t the step's timestep.
SA-II per object (RegionKeys): every query group (background, each object) sees its own set of source and
edit keys. Local blend per object (RegionBlend): the union of the edited objects' own masks, never an
unedited object's pixels. The handlers that use these live in stages.method.control.editing.EditAttention
(fields `layout`, `regions`, `blend`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from stages.method.control import editing
from stages.method.control.editing import layer_hw, slots

LAYOUT_STEPS = 0.3  # layout for steps < int(S * layout_steps)
LAYOUT_STRENGTH = 2.5  # lambda: the bias at t = 1000 for a vanishing mask (logit units)


def nearest(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(F, H, W) labels or masks resized to hw by PyTorch 'nearest' (the sampling KeyMasks uses)."""
    return F.interpolate(x[:, None].float(), size=hw, mode="nearest")[:, 0]


def layout_strength(area: torch.Tensor, t: float, lam: float) -> torch.Tensor:
    """s = lam * (1 - area) * t / 1000: stronger for small objects and early (noisy) steps."""
    return lam * (1.0 - area) * (float(t) / 1000.0)


def biased_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) in float32, returned in q's dtype (bias broadcasts over heads)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores + bias.float()).softmax(dim=-1).to(q.dtype)


class Layout:
    """The layout bias of one window: object masks (R, F, H, W) and the target-phrase token positions of
    each region; active for steps < `steps`, with t read from `timesteps[step]`."""

    def __init__(self, masks: torch.Tensor, positions: Sequence[Sequence[int]], timesteps: Sequence[int],
                 steps: int, strength: float, latent_hw: tuple[int, int]):
        self.masks = masks.bool()
        self.positions = [list(p) for p in positions]
        self.timesteps = list(timesteps)
        self.steps, self.strength, self.latent_hw = steps, strength, latent_hw
        self._masks: dict[int, torch.Tensor] = {}
        self._bias: dict[tuple[int, int, int, str], torch.Tensor] = {}

    def active(self, step: int) -> bool:
        """Whether the bias acts at this step."""
        return step < self.steps and self.strength > 0 and any(self.positions)

    def region_masks(self, n: int, device: torch.device) -> torch.Tensor:
        """(R, F, n) bool masks at the resolution of a layer with n tokens."""
        if n not in self._masks:
            hw = layer_hw(n, self.latent_hw)
            self._masks[n] = torch.stack([nearest(m, hw) > 0.5 for m in self.masks]).flatten(2)
        return self._masks[n].to(device)

    def bias(self, n: int, step: int, keys: int, device: torch.device) -> torch.Tensor | None:
        """(F, 1, n, keys) additive pre-softmax bias for this step, or None outside the layout steps."""
        if not self.active(step):
            return None
        key = (n, keys, step, str(device))
        if key not in self._bias:
            self._bias = {k: v for k, v in self._bias.items() if k[2] == step}  # keep only this step's
            m = self.region_masks(n, device).float()
            s = layout_strength(m.mean(-1), self.timesteps[step], self.strength)  # (R, F)
            signed = s[..., None] * (2.0 * m - 1.0)  # (R, F, n)
            out = torch.zeros(m.shape[1], n, keys, device=device)
            for r, pos in enumerate(self.positions):
                pos = [p for p in pos if p < keys]
                if pos:
                    out[:, :, pos] += signed[r][..., None]
            self._bias[key] = out[:, None]
        return self._bias[key]

    def probs(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The biased cross-attention map of the edit-cond slot."""
        return biased_probs(q, k, bias)


# ----------------------------------------------------------------------------------------- SA-II per object
def region_sa2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         groups: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """SA-II with a key set per query group: groups are (sel (F, N) bool queries, keep (F, 2N) bool keys
    over [source | edit]); one SDPA per group, each query takes its own group's output. Recon slots plain."""
    q0, q1, q2, q3 = slots(q)
    k0, k1, k2, k3 = slots(k)
    v0, v1, v2, v3 = slots(v)
    q_e = torch.cat([q0, q1])
    k_e = torch.cat([torch.cat([k2, k0], dim=2), torch.cat([k3, k1], dim=2)])
    v_e = torch.cat([torch.cat([v2, v0], dim=2), torch.cat([v3, v1], dim=2)])
    out_e = q_e.new_zeros(q_e.shape[:-1] + (v_e.shape[-1],))
    for sel, keep in groups:
        mask = keep[:, None, None, :].repeat(2, 1, 1, 1)  # (2F, 1, 1, 2N)
        o = F.scaled_dot_product_attention(q_e, k_e, v_e, attn_mask=mask)
        out_e = torch.where(sel.repeat(2, 1)[:, None, :, None], o, out_e)
    out_r = F.scaled_dot_product_attention(torch.cat([q2, q3]), torch.cat([k2, k3]), torch.cat([v2, v3]))
    return torch.cat([out_e, out_r])


class RegionKeys:
    """SA-II key sets per query group, from a label map (F, H, W): 0 background, k >= 1 object k.

    background queries: source background, every edit key (today's SA-II);
    edited object k:    source background (its old look is hidden), edit keys of background and object k;
    unedited object k:  source keys of object k only, edit keys of background and object k.
    No query sees another object's edit keys. Groups with equal key sets share one SDPA call; when all
    are equal (one edited object) this is exactly stages.method.control.editing.sa2_attention.
    """

    def __init__(self, labels: torch.Tensor, edited: Sequence[bool], latent_hw: tuple[int, int]):
        self.labels = labels.long()
        self.edited = list(edited)
        self.latent_hw = latent_hw
        self._cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def labels_for(self, n: int) -> torch.Tensor:
        """(F, n) labels at the resolution of a layer with n tokens."""
        return nearest(self.labels, layer_hw(n, self.latent_hw)).round().long().flatten(1)

    def groups(self, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(sel, keep)] for a layer with n tokens, equal key sets merged."""
        if n not in self._cache:
            lab = self.labels_for(n)
            bg = lab == 0
            full = torch.ones_like(bg)
            bg_keep = torch.cat([bg, full], dim=1)
            out: list[tuple[torch.Tensor, torch.Tensor]] = [(bg, bg_keep)]
            for j, edited in enumerate(self.edited, start=1):
                own = lab == j
                keep = torch.cat([bg if edited else own, bg | own], dim=1)
                # frames without the object have no queries here: the background's keys, so groups merge
                out.append((own, torch.where(own.any(1, keepdim=True), keep, bg_keep)))
            merged: list[tuple[torch.Tensor, torch.Tensor]] = []
            for sel, keep in out:
                same = next((i for i, (_, kp) in enumerate(merged) if torch.equal(kp, keep)), None)
                if same is None:
                    merged.append((sel, keep))
                else:
                    merged[same] = (merged[same][0] | sel, keep)
            self._cache[n] = merged
        return [(s.to(device), k.to(device)) for s, k in self._cache[n]]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SA-II per object for one layer call (head layout, 4 slots)."""
        n = q.shape[2]
        groups = self.groups(n, q.device)
        if len(groups) == 1:
            keep = groups[0][1]
            if bool(keep[:, n:].all()):
                return editing.sa2_attention(q, k, v, ~keep[:, :n])
        return region_sa2_attention(q, k, v, groups)


# ----------------------------------------------------------------------------------------- blend per object
class RegionBlend:
    """Local blend per edited object (each a LocalBlend over its own source and target phrase tokens);
    the mask is their union with the pixels of unedited objects (`exclude`, (F, 1, h, w) bool) removed."""

    def __init__(self, blends: Sequence[editing.LocalBlend], exclude: torch.Tensor | None = None):
        self.blends = list(blends)
        self.exclude = exclude if exclude is not None and bool(exclude.any()) else None

    def reset(self) -> None:
        """Forget the maps of the previous step."""
        for b in self.blends:
            b.reset()

    def record(self, p_edit: torch.Tensor, p_src: torch.Tensor) -> None:
        """Add one layer's (F, heads, N, 77) maps to every object's recorder."""
        for b in self.blends:
            b.record(p_edit, p_src)

    def mask(self) -> torch.Tensor | None:
        """(F, 1, h, w) float 0/1 mask, or None when nothing was recorded."""
        masks = [m for m in (b.mask() for b in self.blends) if m is not None]
        if not masks:
            return None
        union = masks[0]
        for m in masks[1:]:
            union = torch.maximum(union, m)
        if self.exclude is not None:
            union = union * (~self.exclude).to(union.device, union.dtype)
        return union
