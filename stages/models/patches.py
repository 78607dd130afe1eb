"""Motion-module GroupNorm fixes applied to diffusers' UNetMotionModel (ALGORITHM.md decision 4 and §11):
per-frame normalisation as the original AnimateDiff code does, and the motion weights' own group count."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.common.errors import InputError


class PerFrameGroupNorm(nn.GroupNorm):
    """The motion module's GroupNorm over a (B, C, F, H, W) tensor; per frame when `per_frame` is set.

    diffusers normalises each group over (C/G, F, H, W), i.e. statistics shared across frames; the original
    AnimateDiff code (which trained the motion weights) normalises "(b f) c h w", one frame at a time.
    Parameters keep their names, so state dicts are unchanged.
    """

    per_frame: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_frame or x.ndim != 5:
            return super().forward(x)
        b, c, f, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        y = F.group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def motion_norms(unet: nn.Module) -> dict[str, nn.GroupNorm]:
    """The input GroupNorm of every motion module (temporal transformer), by module name."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    return {f"{name}.norm": mod.norm for name, mod in unet.named_modules()
            if isinstance(mod, AnimateDiffTransformer3D)}


def set_motion_groups(unet: nn.Module, groups: int) -> int:
    """Give every motion-module GroupNorm the motion weights' own group count.

    diffusers' `UNetMotionModel.from_unet2d` builds them with the UNet's `norm_num_groups`; AnimateDiff's motion
    modules were trained with their own (ALGORITHM.md §11). Parameters are per channel, so only the
    normalisation changes. Returns how many norms were set.
    """
    norms = motion_norms(unet)
    for name, norm in norms.items():
        if norm.num_channels % groups:
            raise InputError(f"{name}: {norm.num_channels} channels cannot form {groups} GroupNorm groups")
        norm.num_groups = int(groups)
    return len(norms)


def set_per_frame_groupnorm(unet: nn.Module, enabled: bool = True) -> int:
    """Make every motion-module GroupNorm per-frame (True) or diffusers' across-frames (False).

    Returns how many norms were switched. Spatial/resnet norms are left alone (already per-frame).
    """
    count = 0
    for name, norm in motion_norms(unet).items():
        if not isinstance(norm, PerFrameGroupNorm):
            norm.__class__ = PerFrameGroupNorm  # same parameters and buffers, new forward
        norm.per_frame = bool(enabled)
        count += 1
    return count
