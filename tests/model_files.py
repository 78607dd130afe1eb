"""The tiny model written to disk in the formats users have (shared by the loading and cross-process tests).

- `write_legacy_folder`: an SD1.5-layout diffusers folder as the real runwayml one is: configs written by an old
  diffusers (only the keys it knew, so current diffusers fills in defaults) and `.bin` pickled weights.
- `write_single_file`: one SD1.5 `.safetensors` checkpoint in the original LDM key layout.
- `write_original_motion_module`: an AnimateDiff motion module in the original `.ckpt` key format.
- `write_adapter_folder`: a diffusers MotionAdapter folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# The keys of the real SD1.5 unet/config.json and vae/config.json (written by diffusers 0.6.0).
SD15_UNET_KEYS = ("act_fn", "attention_head_dim", "block_out_channels", "center_input_sample", "cross_attention_dim",
                  "down_block_types", "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels",
                  "layers_per_block", "mid_block_scale_factor", "norm_eps", "norm_num_groups", "out_channels",
                  "sample_size", "up_block_types")
SD15_VAE_KEYS = ("act_fn", "block_out_channels", "down_block_types", "in_channels", "latent_channels",
                 "layers_per_block", "norm_num_groups", "out_channels", "sample_size", "up_block_types")


def tiny_parts() -> tuple[Any, Any, Any, Any]:
    """(unet2d, adapter, vae, text encoder) of the tiny spec, as load_models("tiny") builds them."""
    from stages.models.configs import TINY_SEED
    from stages.models.random_specs import build_random

    return build_random("tiny", TINY_SEED)[:4]


def _old_config(path: Path, keys: tuple[str, ...], class_name: str) -> None:
    cfg = json.loads(path.read_text())
    old = {"_class_name": class_name, "_diffusers_version": "0.6.0", **{k: cfg[k] for k in keys}}
    path.write_text(json.dumps(old, indent=2))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_legacy_folder(root: Path, parts: tuple[Any, ...]) -> Path:
    """An SD1.5 diffusers folder with old-style configs and `.bin` weights (no safetensors at all)."""
    unet2d, _, vae, text = parts[:4]
    for sub, model, cls, keys in (("unet", unet2d, "UNet2DConditionModel", SD15_UNET_KEYS),
                                  ("vae", vae, "AutoencoderKL", SD15_VAE_KEYS)):
        model.save_pretrained(root / sub, safe_serialization=False)
        _old_config(root / sub / "config.json", keys, cls)
    text.save_pretrained(root / "text_encoder")
    for f in (root / "text_encoder").glob("*.safetensors"):  # transformers 5 always writes safetensors
        f.unlink()
    torch.save(_state(text), root / "text_encoder" / "pytorch_model.bin")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "_diffusers_version": "0.6.0"}))
    return root


def write_config_folder(root: Path, parts: tuple[Any, ...]) -> Path:
    """A current diffusers SD1.5 folder (safetensors); also the config source for single-file checkpoints."""
    unet2d, _, vae, text = parts[:4]
    unet2d.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def write_adapter_folder(root: Path, parts: tuple[Any, ...]) -> Path:
    parts[1].save_pretrained(root)
    return root


def ldm_unet(unet2d: Any) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel (SD1.5 layout) -> original LDM keys."""
    sd = unet2d.state_dict()
    lpb = unet2d.config.layers_per_block
    ren = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
    for i in range(len(unet2d.down_blocks)):
        for j in range(lpb):
            ren[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{3 * i + j + 1}.0"
            ren[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{3 * i + j + 1}.1"
        ren[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{3 * i + 3}.0.op"
    for i, block in enumerate(unet2d.up_blocks):
        for j in range(lpb + 1):
            ren[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{3 * i + j}.0"
            ren[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{3 * i + j}.1"
        ren[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{3 * i + lpb}.{2 if hasattr(block, 'attentions') else 1}.conv"
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    out = {}
    for key, value in sd.items():
        prefix = max((p for p in ren if key.startswith(p + ".")), key=len)
        rest = key[len(prefix) + 1:]
        if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
            head, _, tail = rest.partition(".")
            rest = f"{resnet[head]}.{tail}"
        out[f"model.diffusion_model.{ren[prefix]}.{rest}"] = value
    return out


def ldm_vae(vae: Any) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> original LDM keys (first_stage_model.*, 1x1-conv attention)."""
    n = len(vae.config.block_out_channels)
    ren = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        ren[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        ren[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        ren[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(n):
        for j in range(vae.config.layers_per_block + 1):
            ren[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            ren[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        ren[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        ren[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        prefixes = [p for p in ren if key.startswith(p + ".")]
        if prefixes:
            prefix = max(prefixes, key=len)
            rest = key[len(prefix) + 1:].replace("conv_shortcut", "nin_shortcut")
            if "attentions" in prefix:
                head, _, tail = rest.rpartition(".")
                rest = f"{attn[head]}.{tail}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
            key = f"{ren[prefix]}.{rest}"
        out[f"first_stage_model.{key}"] = value
    return out


def write_single_file(path: Path, parts: tuple[Any, ...]) -> Path:
    """One SD1.5 checkpoint in LDM layout (UNet, VAE, CLIP text encoder) as .safetensors."""
    from safetensors.torch import save_file

    unet2d, _, vae, text = parts[:4]
    ckpt = {**ldm_unet(unet2d), **ldm_vae(vae)}
    ckpt.update({f"cond_stage_model.transformer.{k}": v for k, v in text.state_dict().items()})
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    return path


def original_motion_state(adapter: Any) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter weights -> the original AnimateDiff motion-module keys."""
    original = {}
    for key, value in adapter.state_dict().items():
        parts = key.split(".")
        key = ".".join(parts[:4] + ["temporal_transformer"] + parts[4:])
        key = (key.replace(".norm1", ".norms.0").replace(".norm2", ".norms.1").replace(".norm3", ".ff_norm")
               .replace(".attn1", ".attention_blocks.0").replace(".attn2", ".attention_blocks.1"))
        if key.endswith(".pos_embed.pe"):
            for a in (0, 1):
                original[key.replace(".pos_embed.pe", f".attention_blocks.{a}.pos_encoder.pe")] = value
            continue
        original[key] = value
    return original


def write_original_motion_module(path: Path, parts: tuple[Any, ...], extra: dict | None = None) -> Path:
    """The adapter's weights in the original AnimateDiff `.ckpt` format (torch.save of a plain state dict)."""
    state = original_motion_state(parts[1])
    state.update(extra or {})
    torch.save(state, path)
    return path
