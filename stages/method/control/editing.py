"""Attention edits for `vd edit` (ALGORITHM.md §5): P2P cross-attention, SA-I, SA-II, local blend.

The UNet runs one batch of four slots per step (§5.1); inside every spatial attention module the batch
splits into [edit-uncond, edit-cond, recon-uncond, recon-cond], each (F, heads, N, d).
Handlers are keyed by module name and read the step from the controller (never call counters).
Probability maps are materialised only in P2P cross layers while they are edited or recorded; SA-I and
SA-II are single SDPA calls (SA-II with a boolean key mask broadcast over heads and queries).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from stages.method.control.controller import AttentionController, attention_probs, module_kind

SA1_MAX_TOKENS = 32 * 32  # SA-I acts in self-attention layers with at most this many tokens (§5.4)
SA2_BLOCKS = ("up_blocks.1", "up_blocks.2", "up_blocks.3")
BLEND_BLOCKS = ("down_blocks.2", "up_blocks.1")  # the 16x16 cross layers at 512 px, as in P2P


def in_blocks(name: str, blocks: Sequence[str]) -> bool:
    """Whether module `name` lies inside one of `blocks` ("up_blocks.1" matches "up_blocks.1.*" only)."""
    return any(name == b or name.startswith(b + ".") for b in blocks)


def block_level(name: str, levels: int = 4) -> int:
    """How many times the UNet has halved the latent where module `name` runs (down_blocks.i: i, mid: the
    deepest, up_blocks.j: levels - 1 - j, since an up block attends before its upsampler)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return levels - 1
    if parts[0] == "up_blocks":
        return levels - 1 - int(parts[1])
    raise ValueError(f"{name} is not inside a UNet block")


def layer_tokens(name: str, latent_hw: tuple[int, int], levels: int = 4) -> int:
    """Spatial tokens of module `name` for a latent of size latent_hw (stride-2 convs round up)."""
    h, w = latent_hw
    for _ in range(block_level(name, levels)):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h * w


def sa1_layers(names: Sequence[str], latent_hw: tuple[int, int], max_tokens: int = SA1_MAX_TOKENS,
               blocks: Sequence[str] = (), levels: int = 4) -> list[str]:
    """The spatial self-attention modules SA-I edits: those with <= max_tokens tokens at this resolution
    (the method's rule), or, when `blocks` is given, those inside these blocks (an explicit override)."""
    selves = [n for n in names if module_kind(n) == "self"]
    if blocks:
        return [n for n in selves if in_blocks(n, blocks)]
    return [n for n in selves if layer_tokens(n, latent_hw, levels) <= max_tokens]


def slots(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Split a (4F, ...) attention batch into its four slots."""
    if x.shape[0] % 4:
        raise ValueError(f"edit attention expects a batch of 4 slots, got {x.shape[0]} rows")
    return tuple(x.chunk(4))


# ----------------------------------------------------------------------------------------- kernels
def sa1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SA-I: edit-cond output = softmax(Q_rc K_rc^T) V_ec; other slots plain. One SDPA, no maps."""
    q0, _q1, q2, q3 = slots(q)
    k0, _k1, k2, k3 = slots(k)
    return F.scaled_dot_product_attention(torch.cat([q0, q3, q2, q3]), torch.cat([k0, k3, k2, k3]), v)


def sa2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hide: torch.Tensor) -> torch.Tensor:
    """SA-II: edit slots attend to [K_src | K_edit] with source keys where `hide` (F, N) is True masked out.

    Pairs: edit-uncond with recon-uncond, edit-cond with recon-cond. Recon slots run plain attention.
    """
    q0, q1, q2, q3 = slots(q)
    k0, k1, k2, k3 = slots(k)
    v0, v1, v2, v3 = slots(v)
    keep = torch.cat([~hide, torch.ones_like(hide)], dim=1)  # (F, 2N): source part, edit part
    mask = keep[:, None, None, :].repeat(2, 1, 1, 1)  # (2F, 1, 1, 2N) broadcast over heads and queries
    q_e = torch.cat([q0, q1])
    k_e = torch.cat([torch.cat([k2, k0], dim=2), torch.cat([k3, k1], dim=2)])
    v_e = torch.cat([torch.cat([v2, v0], dim=2), torch.cat([v3, v1], dim=2)])
    out_e = F.scaled_dot_product_attention(q_e, k_e, v_e, attn_mask=mask)
    out_r = F.scaled_dot_product_attention(torch.cat([q2, q3]), torch.cat([k2, k3]), torch.cat([v2, v3]))
    return torch.cat([out_e, out_r])


def p2p_maps(p_edit: torch.Tensor, p_src: torch.Tensor, mapper: torch.Tensor, alphas: torch.Tensor,
             equalizer: torch.Tensor, alpha: float) -> torch.Tensor:
    """P2P refine/swap + reweight of the edit-cond map (§5.3):

    M <- alpha * E * (A * M_src[..., mapper] + (1 - A) * M) + (1 - alpha) * M   (no renormalisation).
    """
    if alpha <= 0.0:
        return p_edit
    dev, dt = p_edit.device, p_edit.dtype
    mapped = p_src[..., mapper.clamp(min=0).to(dev)]  # inserted tokens (-1) get weight 0 below
    a = alphas.to(dev, dt)
    new = equalizer.to(dev, dt) * (a * mapped + (1.0 - a) * p_edit)
    return alpha * new + (1.0 - alpha) * p_edit if alpha < 1.0 else new


# ----------------------------------------------------------------------------------------- masks
class KeyMasks:
    """Per-layer-resolution boolean masks of the source keys SA-II hides, from a (F, H, W) mask."""

    def __init__(self, hide: torch.Tensor, latent_hw: tuple[int, int]):
        self.hide = hide.bool()
        self.latent_hw = latent_hw
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    def for_tokens(self, n: int, device: torch.device) -> torch.Tensor:
        """(F, n) mask for a layer with n tokens (nearest-resized from full resolution, PyTorch 'nearest')."""
        key = (n, str(device))  # cached on the device: a host-to-device copy per call would sync the GPU
        if key not in self._cache:
            h, w = layer_hw(n, self.latent_hw)
            small = F.interpolate(self.hide[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
            self._cache[key] = small.reshape(small.shape[0], h * w).to(device)
        return self._cache[key]


def layer_hw(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Token grid (h, w) of a layer with n tokens in a UNet over a latent of size latent_hw."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == n:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(f"no UNet resolution of latent {latent_hw} has {n} tokens")


class LocalBlend:
    """Cross-attention mask of the blend words (P2P LocalBlend, made to work; ALGORITHM.md decision 8).

    Maps of the blend words' tokens (summed over tokens, averaged over heads and recorded layers) from the
    edit-cond map (target words) and the recon-cond map (source words) are max-pooled 3x3, upsampled to
    the latent, normalised per frame by their maximum and thresholded; the mask is their union.
    """

    def __init__(self, src_pos: Sequence[int], tgt_pos: Sequence[int], latent_hw: tuple[int, int],
                 threshold: float = 0.3):
        self.src_pos, self.tgt_pos = list(src_pos), list(tgt_pos)
        self.latent_hw = latent_hw
        self.threshold = threshold
        self._sums: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._counts: Counter = Counter()
        self._indices: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    def _index(self, pos: list[int], device: torch.device) -> torch.Tensor:
        """`pos` as an index tensor on `device`, made once (a list index is copied to the GPU at every call)."""
        key = (tuple(pos), str(device))
        if key not in self._indices:
            self._indices[key] = torch.tensor(pos, dtype=torch.long, device=device)
        return self._indices[key]

    def reset(self) -> None:
        """Forget the maps of the previous step."""
        self._sums.clear()
        self._counts.clear()

    def record(self, p_edit: torch.Tensor, p_src: torch.Tensor) -> None:
        """Add one layer's (F, heads, N, 77) maps."""
        hw = layer_hw(p_edit.shape[2], self.latent_hw)
        parts = []
        for p, pos in ((p_src, self.src_pos), (p_edit, self.tgt_pos)):
            parts.append(p[..., self._index(pos, p.device)].float().sum(-1).mean(1) if pos
                         else torch.zeros(p.shape[0], p.shape[2], device=p.device))
        if hw in self._sums:
            self._sums[hw] = [a + b for a, b in zip(self._sums[hw], parts)]
        else:
            self._sums[hw] = parts
        self._counts[hw] += 1

    def mask(self) -> torch.Tensor | None:
        """(F, 1, h, w) float 0/1 mask of the blend words for the last step, or None if nothing was recorded."""
        if not self._sums:
            return None
        h, w = self.latent_hw
        union = None
        for which in (0, 1):
            acc = None
            for hw, parts in self._sums.items():
                m = (parts[which] / self._counts[hw]).reshape(-1, 1, *hw)
                m = F.max_pool2d(m, kernel_size=3, stride=1, padding=1)
                m = F.interpolate(m, size=(h, w), mode="nearest")
                acc = m if acc is None else acc + m
            acc = acc / len(self._sums)
            peak = acc.amax(dim=(2, 3), keepdim=True)
            m = (acc / peak.clamp(min=1e-12)) > self.threshold
            m = m & (peak > 0)
            union = m if union is None else union | m
        return union.float()


def plain_around_edit_cond(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain fused attention of the slots the layout leaves alone: (edit-uncond, recon-uncond + recon-cond);
    the edit-cond slot, which the caller replaces, is not computed."""
    f = q.shape[0] // 4
    return (F.scaled_dot_product_attention(q[:f], k[:f], v[:f]),
            F.scaled_dot_product_attention(q[2 * f:], k[2 * f:], v[2 * f:]))


# ----------------------------------------------------------------------------------------- installer
@dataclass
class EditAttention:
    """The attention edits of one `vd edit` run; `install(controller)` registers handlers by module name.

    sa1_steps: SA-I runs for steps < sa1_steps, SA-II for steps >= sa1_steps (T_s in §5.4).
    cross_steps: P2P runs for steps < cross_steps (alpha = 1), then the edit branch keeps its own maps.
    `usage` counts (behaviour, module kind) calls, for tests and reports.
    """

    sa1: bool = True
    sa2: bool = True
    cross: bool = True
    sa1_steps: int = 0
    cross_steps: int = 0
    mapper: torch.Tensor | None = None
    alphas: torch.Tensor | None = None
    equalizer: torch.Tensor | None = None
    key_masks: KeyMasks | None = None
    blend: LocalBlend | None = None
    sa1_layers: Sequence[str] = ()  # module names SA-I edits (see `sa1_layers()`)
    sa2_blocks: Sequence[str] = SA2_BLOCKS
    blend_blocks: Sequence[str] = BLEND_BLOCKS
    usage: Counter = field(default_factory=Counter)
    controller: AttentionController | None = None
    # per-region edits (stages.method.control.layout): Layout modulates the edit-cond scores (cross: every
    # layer; self: below full resolution, where neither SA-I nor SA-II runs), RegionKeys replaces key_masks
    # in SA-II; None keeps the single-subject behaviour exactly
    layout: Any = None
    regions: Any = None

    def install(self, controller: AttentionController) -> dict[str, list[str]]:
        """Register the handlers this edit needs; returns the module names per behaviour."""
        self.controller = controller
        installed: dict[str, list[str]] = {"sa1": [], "sa2": [], "cross": [], "blend": []}
        if self.layout is not None:
            installed["layout"], installed["layout_self"] = [], []
        for name in controller.names:
            kind = module_kind(name)
            if kind == "self":
                wants1 = self.sa1 and self.sa1_steps > 0 and name in self.sa1_layers
                wants2 = self.sa2 and (self.key_masks is not None or self.regions is not None) \
                    and in_blocks(name, self.sa2_blocks)
                lay = self.layout is not None and self.layout.modulates_self(name)
                if wants1:
                    installed["sa1"].append(name)
                if wants2:
                    installed["sa2"].append(name)
                if lay:
                    installed["layout_self"].append(name)
                if wants1 or wants2 or lay:
                    controller.set(name, self._self_handler(wants1, wants2, lay))
            elif kind == "cross":
                p2p = self.cross and self.cross_steps > 0 and self.mapper is not None
                rec = self.blend is not None and in_blocks(name, self.blend_blocks)
                if p2p:
                    installed["cross"].append(name)
                if rec:
                    installed["blend"].append(name)
                if self.layout is not None:
                    installed["layout"].append(name)
                if p2p or rec or self.layout is not None:
                    controller.set(name, self._cross_handler(p2p, rec))
        return installed

    def _step(self) -> int:
        assert self.controller is not None
        return self.controller.step

    def _self_handler(self, use_sa1: bool, use_sa2: bool, use_layout: bool = False):
        def handler(name: str, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            step = self._step()
            if use_sa1 and step < self.sa1_steps:
                self.usage["sa1"] += 1
                return sa1_attention(q, k, v)
            if use_sa2 and step >= self.sa1_steps:
                self.usage["sa2"] += 1
                if self.regions is not None:
                    return self.regions.attention(q, k, v)
                assert self.key_masks is not None
                return sa2_attention(q, k, v, self.key_masks.for_tokens(q.shape[2], q.device))
            # the layout only where the edit-cond slot attends over its own keys (SA-I/SA-II replace it)
            if use_layout and self.layout is not None and self.layout.active(step):
                self.usage["layout_self"] += 1
                return self.layout.self_attention(q, k, v, step)
            self.usage["self_plain"] += 1
            return F.scaled_dot_product_attention(q, k, v)

        return handler

    def _cross_handler(self, use_p2p: bool, use_blend: bool):
        # read once here, not per call: the alphas live on the UNet's device (a read there syncs the GPU)
        aligned = self.alphas is not None and bool((self.alphas >= 1).all())

        def handler(name: str, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            step = self._step()
            edit = use_p2p and step < self.cross_steps
            # a swap replaces every token's map and nothing records it: the modulation would be moot
            moot = edit and not use_blend and aligned
            lay = self.layout is not None and self.layout.active(step) and not moot
            if not edit and not use_blend and not lay:
                self.usage["cross_plain"] += 1
                return F.scaled_dot_product_attention(q, k, v)
            q0, q1, q2, q3 = slots(q)
            k0, k1, k2, k3 = slots(k)
            v0, v1, v2, v3 = slots(v)
            if lay and not edit and not use_blend:  # layout only: the other slots stay the plain fused attention
                self.usage["layout"] += 1
                out0, rest = plain_around_edit_cond(q, k, v)
                return torch.cat([out0, torch.matmul(self.layout.cross_probs(q1, k1, step), v1), rest])
            p1 = self.layout.cross_probs(q1, k1, step) if lay else attention_probs(q1, k1)
            p3 = attention_probs(q3, k3)
            if lay:
                self.usage["layout"] += 1
            if use_blend and self.blend is not None:
                self.blend.record(p1, p3)
            if edit:
                self.usage["p2p"] += 1
                assert self.mapper is not None and self.alphas is not None and self.equalizer is not None
                p1 = p2p_maps(p1, p3, self.mapper, self.alphas, self.equalizer, 1.0)
            out0 = F.scaled_dot_product_attention(q0, k0, v0)
            out2 = F.scaled_dot_product_attention(q2, k2, v2)
            return torch.cat([out0, torch.matmul(p1, v1), out2, torch.matmul(p3, v3)])

        return handler
