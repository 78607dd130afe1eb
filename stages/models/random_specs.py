"""The specs built with random weights: "tiny" (SD1.5-shaped, small widths, seconds on CPU, for tests) and
"sd15-random" (the full SD1.5 + AnimateDiff v3 architecture, for benchmarks). Deterministic in the seed."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from stages.models.configs import RANDOM_SPECS
from stages.models.identity import random_fingerprint


def _tame_tiny(unet2d: nn.Module, adapter: nn.Module, vae: nn.Module, text: nn.Module, gen: torch.Generator) -> None:
    """Keep random weights in a sane regime and make every norm affine matter.

    Default init lets the text branch move epsilon by ~20% and CFG at 7.5 then explodes latents; shrinking
    the cross-attention output projections keeps CFG stable. Perturbed norm affines make a forgotten affine
    (or a wrong norm) visible in tests. The motion modules' proj_out must be non-zero or they are no-ops.
    """
    with torch.no_grad():
        for model in (unet2d, adapter, vae, text):
            for name, mod in model.named_modules():
                if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)) and getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
                    if mod.bias is not None:
                        mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=gen))
                if name.endswith("attn2.to_out.0") and model is unet2d:
                    mod.weight.mul_(0.2)
                if name.endswith("proj_out") and model is adapter:
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / mod.weight.shape[1] ** 0.5)
                    mod.bias.zero_()


def build_random(spec: str, seed: int) -> tuple[Any, Any, Any, Any, str]:
    """(unet2d, motion adapter, vae, text encoder, fingerprint) of a RANDOM_SPECS spec, deterministic in `seed`;
    the global torch RNG is left as it was."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, adapter_cfg, vae_cfg, text_cfg = RANDOM_SPECS[spec]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet2d = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 1)
        adapter = MotionAdapter(**adapter_cfg)
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**vae_cfg)
        torch.manual_seed(seed + 3)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    if spec == "tiny":
        gen = torch.Generator().manual_seed(seed + 4)
        _tame_tiny(unet2d, adapter, vae, text, gen)
    return unet2d, adapter, vae, text, random_fingerprint(spec, seed, (unet_cfg, adapter_cfg, vae_cfg, text_cfg))
