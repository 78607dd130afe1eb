"""STDG (spatial-temporal decoupled guidance): masks, compact targets, the four losses (ALGORITHM.md §2.2, §3).

Every STDG loss only ever reads from the ground-truth (GT) pass UNet(z*_t, t, c_src):
- for each temporal-attention map (rows (p, head, query frame i), key frames j): the top-1 value and its
  key-frame index j* per row (the reference's top-K mask with K = 1 is exactly this argmax one-hot);
- for each spatial attn1 key tensor (F, HW, C): the foreground and background masked-mean key per frame.
These compact targets are exact sufficient statistics: `temporal_mse` on them equals the full-map
formulation (`temporal_mse_full`) and `key_mse` equals the reference's masked-mean key loss.

Layouts (batch 1, the conditional branch):
- temporal maps: (HW, heads, F, F), rows p row-major over the layer's (s_h, s_w) grid (diffusers'
  AnimateDiffTransformer3D flattens "(b h w) f c"); region selection is per (p, query frame i).
- spatial keys: (F, HW, C), the to_k output before the head split.
Targets are stored in the workspace as float16 values + uint8 indices and float32 (2, F, C) keys; the
losses of the run that computes them use the in-memory float32 values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# loss weights per decoder block (config weight_each [20000, 10000]; the /100, x100 pair cancels)
BLOCK_WEIGHTS = {1: 20000.0, 2: 10000.0}
KEY_EPS = 1e-5
COMPONENTS = ("T_fg", "T_bg", "K_fg", "K_bg")
_BLOCK = re.compile(r"^up_blocks\.(\d+)\.")


def layer_weight(name: str) -> float:
    """Loss weight of an STDG layer from its decoder block (20000 up_blocks.1, 10000 up_blocks.2)."""
    m = _BLOCK.match(name)
    if not m or int(m.group(1)) not in BLOCK_WEIGHTS:
        raise ValueError(f"{name!r} is not in an STDG block ({sorted(BLOCK_WEIGHTS)})")
    return BLOCK_WEIGHTS[int(m.group(1))]


def layer_grid(tokens: int, h: int, w: int) -> tuple[int, int]:
    """The (s_h, s_w) token grid of a layer with `tokens` positions in a UNet fed h x w latents.

    Each UNet level halves the size with ceil (stride-2 conv, padding 1).
    """
    sh, sw = h, w
    while sh * sw > tokens and (sh > 1 or sw > 1):
        sh, sw = -(-sh // 2), -(-sw // 2)
    if sh * sw != tokens:
        raise ValueError(f"{tokens} tokens do not match a downsampled {h}x{w} latent grid")
    return sh, sw


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boolean (F, H, W) -> (F, s_h, s_w) with PyTorch "nearest" (top-left sample), from full resolution."""
    out = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]
    return out > 0.5


class RegionMasks:
    """Foreground (mask) and background (not mask, negated at full resolution), resized per layer grid."""

    def __init__(self, mask: torch.Tensor, latent_hw: tuple[int, int]):
        self.fg = mask.bool()
        self.bg = ~self.fg
        self.latent_hw = latent_hw
        self._cache: dict[int, torch.Tensor] = {}

    def tokens(self, n_tokens: int) -> torch.Tensor:
        """(2, F, HW) bool: [foreground, background] at the layer with `n_tokens` positions (row-major)."""
        if n_tokens not in self._cache:
            size = layer_grid(n_tokens, *self.latent_hw)
            fg = resize_mask(self.fg, size).flatten(1)
            bg = resize_mask(self.bg, size).flatten(1)
            self._cache[n_tokens] = torch.stack([fg, bg])
        return self._cache[n_tokens]


# ------------------------------------------------------------------------------------------- reductions

def _acc(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def temporal_top1(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GT temporal map (..., F_query, F_key) -> top-1 value (>= float32) and key-frame index (int64) per row."""
    value, index = _acc(probs).max(dim=-1)
    return value, index


def gather_top1(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Entries of a generated map at the GT top-1 key frames: (..., F, F), (..., F) -> (..., F) float32."""
    return _acc(probs).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def masked_mean_keys(keys: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Keys (F, HW, C) and region masks (2, F, HW) -> (2, F, C) float32 masked spatial means per frame.

    sum_p m(p, i) K[i, p] / (sum_p m(p, i) + 1e-5), as the reference; an empty region gives 0.
    """
    keys = _acc(keys)
    m = regions.to(keys.dtype)
    num = torch.einsum("rfp,fpc->rfc", m, keys)
    return num / (m.sum(-1, keepdim=True) + KEY_EPS)


def temporal_mse(gen: torch.Tensor, ref: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Mean of (ref - gen)^2 over the selected (p, h, i) rows.

    gen/ref: (HW, heads, F) top-1 entries; select: (F, HW) bool region of (query frame, position).
    Normalised by the number of selected entries; an empty region gives exactly 0 (not NaN).
    """
    sel = select.t().unsqueeze(1).to(gen.dtype)  # (HW, 1, F), broadcast over heads
    count = sel.sum() * gen.shape[1]
    sq = (ref.to(gen.dtype) - gen) ** 2 * sel
    return sq.sum() / count.clamp(min=1.0)


def temporal_mse_full(gen_map: torch.Tensor, ref_map: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """The reference's formulation on full maps (HW, heads, F, F): top-1 one-hot of the GT map along key
    frames (via sort, K = 1) ANDed with the region, MSE over the selected entries. For tests."""
    order = ref_map.sort(dim=-1, descending=True).indices[..., :1]
    onehot = torch.zeros_like(ref_map, dtype=torch.bool).scatter_(-1, order, True)
    region = select.t()[:, None, :, None]  # (HW, 1, F_query, 1)
    chosen = onehot & region
    diff = (_acc(ref_map) - _acc(gen_map))[chosen]
    return (diff**2).mean() if diff.numel() else gen_map.sum() * 0.0


def key_mse(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """MSE over (frame, channel) of masked-mean keys (F, C)."""
    return ((ref.to(gen.dtype) - gen) ** 2).mean()


# --------------------------------------------------------------------------------------- targets/losses

@dataclass
class Targets:
    """GT statistics of one step: temporal {layer: (value (HW,h,F) f32, index (HW,h,F) int64)} and
    keys {layer: (2, F, C) f32 masked-mean keys [fg, bg]}."""

    temporal: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Generated:
    """What the grad forward keeps per layer: temporal {layer: top-1 entries (HW, h, F)} at the GT
    indices, keys {layer: (2, F, C) masked-mean keys}."""

    temporal: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)


def stdg_losses(gen: Generated, ref: Targets, masks: RegionMasks) -> dict[str, torch.Tensor]:
    """The four losses {T_fg, T_bg, K_fg, K_bg} (ALGORITHM.md §3.2-3.3): per-layer weighted MSEs, mean
    over the temporal layers (T) and over the spatial layers (K)."""
    out: dict[str, torch.Tensor] = {}
    for r, region in enumerate(("fg", "bg")):
        terms = []
        for name, (value, _) in ref.temporal.items():
            sel = masks.tokens(value.shape[0])[r]
            terms.append(layer_weight(name) * temporal_mse(gen.temporal[name], value, sel))
        out[f"T_{region}"] = torch.stack(terms).mean() if terms else torch.zeros(())
    for r, region in enumerate(("fg", "bg")):
        terms = [layer_weight(name) * key_mse(gen.keys[name][r], keys[r]) for name, keys in ref.keys.items()]
        out[f"K_{region}"] = torch.stack(terms).mean() if terms else torch.zeros(())
    return {k: out[k] for k in COMPONENTS}


def combine(losses: dict[str, torch.Tensor], coefficients: tuple[float, float, float, float]) -> torch.Tensor:
    """eta_f L_T^f + eta_b L_T^b + zeta_f L_K^f + zeta_b L_K^b, skipping zero-coefficient terms."""
    terms = [c * losses[name] for name, c in zip(COMPONENTS, coefficients) if c != 0.0]
    if not terms:
        raise ValueError("all STDG coefficients are zero")
    return torch.stack(terms).sum()


def needs_terms(coefficients: tuple[float, float, float, float]) -> tuple[bool, bool]:
    """(temporal needed, keys needed) for these coefficients."""
    return (coefficients[0] != 0.0 or coefficients[1] != 0.0), (coefficients[2] != 0.0 or coefficients[3] != 0.0)


def parse_coefficients(text: str | list | tuple) -> tuple[float, float, float, float]:
    """'ETA_F,ETA_B,ZETA_F,ZETA_B' (or a 4-list) -> four finite non-negative floats."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"STDG coefficients must be 4 numbers ETA_F,ETA_B,ZETA_F,ZETA_B, got {text!r}") from None
    if len(values) != 4 or any(not (v == v and abs(v) != float("inf")) or v < 0 for v in values):
        raise ValueError(f"STDG coefficients must be 4 finite non-negative numbers ETA_F,ETA_B,ZETA_F,ZETA_B, "
                         f"got {text!r}")
    return values  # type: ignore[return-value]
