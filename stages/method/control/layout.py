"""Attention pieces of per-region edits (`vd edit --region`, docs/concepts/extensions.md).

Layout modulation: VideoGrain's published rule (ALGORITHM.md §13.3; its ST-Layout attention). On the
pre-softmax scores S = q k^T / sqrt(d) of the edit-cond slot, for steps i < int(S_steps * layout_steps):

    S <- S + P * s * weight * (max_k S - S) - (not P) * s * weight * (S - min_k S)
    weight = lambda * w_t,   w_t = ((t - 1) / 1000) ** 5   (t the step's timestep)

with max and min over the keys of each query row, s the size regularisation of the query pixel
(`size_regularisation`) and lambda = 1.0 (cross) or 0.3 (self), both times --layout-strength.

Regions. vd's label map (stages.edit.regions.load_objects) splits every frame into the background (label 0,
outside every object) and the workspace's objects (label k); each part is one region, the background
included, as VideoGrain's configs give the background a layout mask of its own. So no pixel of a frame is
in no region, and s of a background pixel is 1 - (background pixels) / (frame pixels).
- Cross-attention (every layer): P[n, j] when pixel n lies in an edited object and token j is one of its
  target-phrase tokens; every other token at that pixel is not P (start token, other words, padding).
  The background and unedited objects have no phrase: all their tokens are not P, so their rows are only
  flattened (VideoGrain treats a region with an empty phrase the same way).
- Self-attention (spatial attn1, per frame): P[n, m] when query n and key m carry the same label. Only in
  layers below the full latent resolution: VideoGrain leaves its 64x64 layers (of a 64x64 latent)
  unmodulated; vd uses that ratio, so at 512 px the 32x32, 16x16 and 8x8 layers and, with the tiny
  model's 8x8 latent, its 4x4, 2x2 and 1x1 layers.

Slots. Only edit-cond is modulated. Edit-uncond is never modulated: VideoGrain's controller modulates the
conditional half of its CFG batch; the unconditional branch carries vd's optimised null text, which has no
phrase tokens; and CFG eps_c + w (eps_c - eps_u) carries the layout through the difference. (Its sliced
full-frame self-attention applies the controller to the first `heads` slices, which in its [uncond, cond]
batch are the unconditional half; read as a leftover of slicing written for a batch of one, since every
other path takes the conditional half.) The recon slots never change: their outputs are bit for bit those
of the same call without the layout.

Composition (EditAttention): the modulated cross map still goes through P2P, which replaces the maps of
aligned tokens (all of them in swap mode, where vd skips the modulation unless a local blend records the
map), so there it is moot; SA-I and SA-II replace the edit-cond self-attention, and in their layers and
steps vd does not modulate it (VideoGrain has no SA-II; its key set [source | edit] is left as it is).

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
from stages.method.control.editing import block_level, layer_hw, plain_around_edit_cond, slots

LAYOUT_STEPS = 0.3  # modulation for steps < int(S * layout_steps): VideoGrain's 15 of 50
LAYOUT_STRENGTH = 1.0  # --layout-strength: a multiplier of both lambdas below
LAYOUT_CROSS_STRENGTH = 1.0  # lambda of cross-attention (VideoGrain's creg)
LAYOUT_SELF_STRENGTH = 0.3  # lambda of self-attention (VideoGrain's sreg)
SCORE_BUDGET = 1 << 26  # float32 scores per chunk of frames in the modulated self-attention (256 MiB)


def nearest(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(F, H, W) labels or masks resized to hw by PyTorch 'nearest' (the sampling KeyMasks uses)."""
    return F.interpolate(x[:, None].float(), size=hw, mode="nearest")[:, 0]


def time_weight(t: float) -> float:
    """w_t = ((t - 1) / 1000) ** 5: near 1 at the first, noisiest step, 0 at t = 1 (and at vd's final t = 0,
    where the formula would give -1e-15)."""
    return (max(float(t) - 1.0, 0.0) / 1000.0) ** 5


def modulate(scores: torch.Tensor, positive: torch.Tensor, size_reg: torch.Tensor, weight: float) -> torch.Tensor:
    """S + P s w (max_k S - S) - (not P) s w (S - min_k S); scores and positive (..., n, k), size_reg
    (..., n, 1), weight = lambda * w_t. Max and min over the keys of each query row."""
    hi = scores.amax(dim=-1, keepdim=True)
    lo = scores.amin(dim=-1, keepdim=True)
    a = size_reg * weight
    return torch.where(positive, scores + a * (hi - scores), scores - a * (scores - lo))


def size_regularisation(labels: torch.Tensor) -> torch.Tensor:
    """s per pixel of an (F, H, W) label map: 1 - (pixels of the pixel's label in its frame) / (pixels of the
    frame); label 0 means "in no region" and gets s = 1. Returns float32 (F, H, W)."""
    flat = labels.long().flatten(1)
    counts = torch.zeros(flat.shape[0], int(flat.max()) + 1, dtype=torch.float32, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    s = 1.0 - counts.gather(1, flat) / flat.shape[1]
    return torch.where(flat == 0, torch.ones_like(s), s).reshape(labels.shape)


class Layout:
    """The layout modulation of one window.

    labels (F, H, W) int: 0 background, k object k of the workspace; positions[k - 1] the target-phrase
    token positions of object k (empty for an object the edit does not name); active for steps < `steps`,
    with t read from `timesteps[step]`; `strength` multiplies both lambdas.
    """

    def __init__(self, labels: torch.Tensor, positions: Sequence[Sequence[int]], timesteps: Sequence[int],
                 steps: int, strength: float, latent_hw: tuple[int, int], levels: int = 4):
        self.labels = labels.long()
        self.positions = [sorted({int(p) for p in pos}) for pos in positions]
        self.timesteps = list(timesteps)
        self.steps, self.strength, self.latent_hw, self.levels = steps, float(strength), latent_hw, levels
        # per (tokens, device): made once on the device, as a host-to-device copy per call would sync the GPU
        self._layers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables: dict[tuple[int, int, str], torch.Tensor] = {}

    def active(self, step: int) -> bool:
        """Whether the modulation acts at this step."""
        return step < self.steps and self.strength > 0

    def weight(self, step: int, lam: float) -> float:
        """strength * lambda * w_t of this step."""
        return self.strength * lam * time_weight(self.timesteps[step])

    def modulates_self(self, name: str) -> bool:
        """Whether self-attention module `name` lies below the full latent resolution."""
        return block_level(name, self.levels) >= 1

    def layer(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels (F, n) int64, s (F, n, 1) float32) at the resolution of a layer with n tokens; the
        background counts as a region of its own (label 0 -> 1 for the size regularisation)."""
        key = (n, str(device))
        if key not in self._layers:
            lab = nearest(self.labels, layer_hw(n, self.latent_hw)).round().long()
            self._layers[key] = (lab.flatten(1).to(device),
                                 size_regularisation(lab + 1).flatten(1)[..., None].to(device))
        return self._layers[key]

    def cross_positive(self, labels: torch.Tensor, keys: int) -> torch.Tensor:
        """(F, n, keys) bool: P[n, j] when pixel n's object is edited and j is one of its phrase tokens.
        `labels` is a layer's label map (self.layer), so the mask is made once per (tokens, keys, device)."""
        key = (labels.shape[1], keys, str(labels.device))
        if key not in self._tables:
            table = torch.zeros(len(self.positions) + 1, keys, dtype=torch.bool)
            for k, pos in enumerate(self.positions, start=1):
                pos = [p for p in pos if p < keys]
                table[k, pos] = True
            self._tables[key] = table.to(labels.device)[labels]
        return self._tables[key]

    def cross_probs(self, q: torch.Tensor, k: torch.Tensor, step: int) -> torch.Tensor:
        """The modulated edit-cond cross-attention map (F, heads, n, keys), in q's dtype."""
        lab, s = self.layer(q.shape[2], q.device)
        with torch.autocast(device_type=q.device.type, enabled=False):
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
            positive = self.cross_positive(lab, k.shape[2])[:, None]
            out = modulate(scores, positive, s[:, None], self.weight(step, LAYOUT_CROSS_STRENGTH))
            return out.softmax(dim=-1).to(q.dtype)

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: int) -> torch.Tensor:
        """Self-attention of one layer call (head layout, 4 slots): edit-cond modulated, the other slots the
        plain fused attention. Scores are materialised per chunk of frames."""
        _q0, q1, _q2, _q3 = slots(q)
        _k0, k1, _k2, _k3 = slots(k)
        _v0, v1, _v2, _v3 = slots(v)
        f, heads, n, _ = q1.shape
        out0, rest = plain_around_edit_cond(q, k, v)
        lab, s = self.layer(n, q.device)
        weight = self.weight(step, LAYOUT_SELF_STRENGTH)
        chunk = max(1, SCORE_BUDGET // (heads * n * n))
        parts = []
        with torch.autocast(device_type=q.device.type, enabled=False):
            for a in range(0, f, chunk):
                b = min(f, a + chunk)
                scores = torch.matmul(q1[a:b].float(), k1[a:b].float().transpose(-1, -2)) * q1.shape[-1] ** -0.5
                positive = (lab[a:b, :, None] == lab[a:b, None, :])[:, None]
                probs = modulate(scores, positive, s[a:b, None], weight).softmax(dim=-1)
                parts.append(torch.matmul(probs, v1[a:b].float()).to(out0.dtype))
        return torch.cat([out0, torch.cat(parts), rest])


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
        self._on: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}  # the device copies

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
        key = (n, str(device))  # copied once: a host-to-device copy per call would sync the GPU
        if key not in self._on:
            self._on[key] = [(s.to(device), k.to(device)) for s, k in self._cache[n]]
        return self._on[key]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SA-II per object for one layer call (head layout, 4 slots)."""
        n = q.shape[2]
        groups = self.groups(n, q.device)
        if len(groups) == 1:
            keep = groups[0][1]
            if bool(self._cache[n][0][1][:, n:].all()):  # read on the host copy: no GPU sync
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
