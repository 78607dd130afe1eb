"""Weights in the formats users have besides diffusers folders: a single-file SD1.5 checkpoint (LDM key
layout) and the original AnimateDiff motion module (`v3_sd15_mm.ckpt` key layout), converted to diffusers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from stages.common.errors import InputError, ModelMissingError
from stages.models.configs import (ORIGINAL_MOTION_GROUPS, SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG,
                                   V3_ADAPTER_CONFIG)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (safetensors, or a pickle read with weights_only)."""
    from stages.io.weights import read_state_dict as read

    if not path.is_file():
        raise ModelMissingError(f"weights file not found: {path}")
    return read(path)


def strict_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str, path: Path,
                ignore_missing: tuple[str, ...] = ()) -> None:
    """load_state_dict that raises a one-line InputError on any missing (not ignored) or unexpected key."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(ignore_missing)] if ignore_missing else list(missing)
    if missing or unexpected:
        sample = (missing or unexpected)[0]
        raise InputError(f"{path.name} is not a compatible {what} checkpoint "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {sample})")


def folder_tokenizer(folder: Path | None) -> Any:
    """The folder's CLIP tokenizer when it has one, else the bundled one (same ids)."""
    from stages.models.tokenizer import clip_tokenizer

    if folder is not None and (folder / "tokenizer" / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        try:
            return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        except Exception:
            pass
    return clip_tokenizer()


def load_single_file(path: Path, config_dir: Path | None) -> tuple[Any, Any, Any, Any]:
    """(unet2d, vae, text encoder, tokenizer) from a single-file SD1.5 checkpoint in LDM layout.

    Configs come from `config_dir` (an SD1.5 diffusers folder) when given, else from the SD1.5 configs
    in stages.models.configs, so no Hub access is needed.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    if config_dir is not None:
        unet_cfg = dict(UNet2DConditionModel.load_config(config_dir, subfolder="unet", local_files_only=True))
        vae_cfg = dict(AutoencoderKL.load_config(config_dir, subfolder="vae", local_files_only=True))
        text_cfg = CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder", local_files_only=True)
    else:
        unet_cfg, vae_cfg, text_cfg = dict(SD15_UNET_CONFIG), dict(SD15_VAE_CONFIG), CLIPTextConfig(**SD15_TEXT_CONFIG)
    ckpt = read_state_dict(path)
    if not any(k.startswith("model.diffusion_model.") for k in ckpt):
        raise InputError(f"{path.name} is not an SD1.5 single-file checkpoint (no model.diffusion_model.* keys)")

    unet2d = UNet2DConditionModel.from_config(unet_cfg)
    strict_load(unet2d, convert_ldm_unet_checkpoint(ckpt, unet_cfg), "SD1.5 UNet", path)
    vae = AutoencoderKL.from_config(vae_cfg)
    strict_load(vae, convert_ldm_vae_checkpoint(ckpt, vae_cfg), "SD1.5 VAE", path)
    text = CLIPTextModel(text_cfg)
    text_sd = convert_ldm_clip_checkpoint(ckpt)
    # "text_model." exists in LDM checkpoints and in transformers 4's CLIPTextModel, not in transformers 5's.
    nested = any(k.startswith("text_model.") for k in text.state_dict())
    text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    if nested:
        text_sd = {f"text_model.{k}": v for k, v in text_sd.items()}
    text_sd = {k: v for k, v in text_sd.items() if not k.endswith("position_ids")}
    strict_load(text, text_sd, "CLIP text encoder", path)
    return unet2d, vae, text, folder_tokenizer(config_dir)


def convert_original_motion_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original AnimateDiff motion-module keys -> diffusers MotionAdapter keys (positional tables kept)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if "motion_modules." not in key:
            continue
        key = key.removeprefix("module.").removeprefix("model.diffusion_model.")
        key = key.replace("input_blocks.", "down_blocks.").replace("output_blocks.", "up_blocks.")
        if ".pos_encoder." in key:
            # one table per attention block in the original, one per transformer block in diffusers
            if ".attention_blocks.0." not in key:
                continue
            key = key.replace(".attention_blocks.0.pos_encoder.pe", ".pos_embed.pe")
        key = (key.replace(".temporal_transformer", "").replace(".norms.0", ".norm1").replace(".norms.1", ".norm2")
               .replace(".ff_norm", ".norm3").replace(".attention_blocks.0", ".attn1")
               .replace(".attention_blocks.1", ".attn2"))
        out[key] = value
    return out


def adapter_config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The v3 MotionAdapter config with channels, layer counts, mid block and max length read from the weights.

    Heads and GroupNorm groups cannot be read from weights; the original AnimateDiff motion modules always
    use 8 heads and 32 groups (never the UNet's group count).
    """
    cfg = dict(V3_ADAPTER_CONFIG)
    channels, layers = [], []
    for i in range(8):
        norms = sorted(int(k.split(".")[3]) for k in sd
                       if k.startswith(f"down_blocks.{i}.motion_modules.") and k.endswith(".norm.weight")
                       and k.count(".") == 5)
        if not norms:
            break
        channels.append(int(sd[f"down_blocks.{i}.motion_modules.0.norm.weight"].shape[0]))
        layers.append(norms[-1] + 1)
    if not channels:
        raise InputError("checkpoint holds no AnimateDiff motion modules (no down_blocks.*.motion_modules.* keys)")
    cfg["block_out_channels"] = channels
    cfg["motion_layers_per_block"] = layers[0] if len(set(layers)) == 1 else layers
    cfg["use_motion_mid_block"] = any(k.startswith("mid_block.motion_modules.") for k in sd)
    pe = [v for k, v in sd.items() if k.endswith(".pos_embed.pe")]
    if pe:
        cfg["motion_max_seq_length"] = int(pe[0].shape[1])
    if any(c % ORIGINAL_MOTION_GROUPS for c in channels):
        raise InputError(f"motion-module channels {channels} are not divisible by the original AnimateDiff's "
                         f"{ORIGINAL_MOTION_GROUPS} GroupNorm groups; use a diffusers MotionAdapter folder instead")
    cfg["motion_norm_num_groups"] = ORIGINAL_MOTION_GROUPS
    return cfg


def adapter_from_file(path: Path) -> tuple[Any, dict[str, Any]]:
    """(MotionAdapter, its config) from one weights file: the original AnimateDiff layout or diffusers keys."""
    from diffusers import MotionAdapter

    sd = read_state_dict(path)
    if any(".temporal_transformer." in k for k in sd):
        sd = convert_original_motion_module(sd)
    config = adapter_config_from_state_dict(sd)
    adapter = MotionAdapter(**config)
    # pos_embed tables are fixed sinusoids; keep diffusers' own when the file has none
    strict_load(adapter, sd, "AnimateDiff v3 motion module", path, ignore_missing=(".pos_embed.pe",))
    return adapter, config
