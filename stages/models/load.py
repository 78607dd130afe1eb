"""Model specs -> frozen components (UNetMotionModel, VAE, CLIP text encoder, tokenizer) and the few calls
the stages make on them (text encoding, VAE encode/decode, one UNet noise prediction).

Specs:
- "tiny": SD1.5-shaped components with random weights built from configs with a fixed seed (offline,
  seconds on CPU), kept in a sane numeric regime (see `_tame_tiny`).
- "sd15-random": the full SD1.5 + AnimateDiff v3 architecture with random weights (benchmarks).
- "sd15-animatediff-v3": SD1.5 + AnimateDiff v3 motion adapter from the Hugging Face cache (or VD_SD15 /
  VD_MOTION_ADAPTER / keyword paths): a diffusers folder, an SD1.5 single-file .safetensors, and a
  diffusers MotionAdapter folder or the original `v3_sd15_mm.ckpt`.
- a path: a local diffusers SD1.5 folder or a single-file SD1.5 checkpoint (motion adapter as above).

The motion modules normalise per frame by default (ALGORITHM.md decision 4, `per_frame_groupnorm`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.common.errors import InputError, ModelMissingError, UsageError
from stages.common.digest import digest
from stages.common.errors import first_line

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ADAPTER_REPO = "guoyww/animatediff-motion-adapter-v1-5-3"
V3_CKPT_URL = "https://huggingface.co/guoyww/animatediff/resolve/main/v3_sd15_mm.ckpt"
DEFAULT_SPEC = "sd15-animatediff-v3"
ORIGINAL_MOTION_GROUPS = 32  # GroupNorm groups of every motion module in the original AnimateDiff code
TINY_SEED = 0
LATENT_SCALE = 0.18215
MODEL_SUBFOLDERS = ("unet", "vae", "text_encoder")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")

SD15_GET = (f"hf download {SD15_REPO} --include 'unet/*' --include 'vae/*' --include 'text_encoder/*' "
            "--include 'tokenizer/*' --exclude '*.bin' --exclude '*fp16*' --exclude '*non_ema*' (about 4.3 GB), "
            "or set VD_SD15 to an SD1.5 diffusers folder or single-file .safetensors")
ADAPTER_GET = (f"hf download {ADAPTER_REPO}, or set VD_MOTION_ADAPTER to a MotionAdapter folder or to "
               f"v3_sd15_mm.ckpt ({V3_CKPT_URL})")

# --------------------------------------------------------------------------------------------- configs

SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "down_block_types": list(SD_DOWN), "up_block_types": list(SD_UP),
    "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": LATENT_SCALE,
}
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 49407,
}
V3_ADAPTER_CONFIG: dict[str, Any] = {
    "block_out_channels": [320, 640, 1280, 1280], "motion_layers_per_block": 2,
    "motion_transformer_layers_per_block": 1, "motion_mid_block_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": 1, "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32, "motion_max_seq_length": 32, "use_motion_mid_block": False,
    "conv_in_channels": None,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG, "sample_size": 8, "block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8,
    "cross_attention_dim": 32, "attention_head_dim": 2,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG, "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "sample_size": 64,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    **SD15_TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "projection_dim": 32,
}
TINY_ADAPTER_CONFIG: dict[str, Any] = {
    **V3_ADAPTER_CONFIG, "block_out_channels": [32, 32, 64, 64], "motion_norm_num_groups": 8,
}
RANDOM_SPECS = {
    "tiny": (TINY_UNET_CONFIG, TINY_ADAPTER_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG),
    "sd15-random": (SD15_UNET_CONFIG, V3_ADAPTER_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG),
}


# ---------------------------------------------------------------------------------------------- models

@dataclass
class Models:
    """Frozen components in eval mode plus what identifies them."""

    unet: Any  # diffusers UNetMotionModel
    vae: Any  # diffusers AutoencoderKL (float32)
    text_encoder: Any  # transformers CLIPTextModel (float32)
    tokenizer: Any  # transformers CLIPTokenizer
    spec: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype  # UNet compute dtype (autocast on CUDA)
    per_frame_groupnorm: bool = True
    sources: dict[str, str] = field(default_factory=dict)  # where each component came from

    @property
    def max_frames(self) -> int:
        return int(self.unet.config.motion_max_seq_length)

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if isinstance(device, torch.device):
        return device
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r} (use auto, cpu or cuda)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA GPU is available")
    return dev


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on cuda, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", "", None):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)")
    return _DTYPES[dtype]


# ------------------------------------------------------------------------ motion-module GroupNorm switch

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


# ---------------------------------------------------------------------------------------- random specs

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


def _config_hash(*configs: dict[str, Any]) -> str:
    return digest(list(configs), length=12)


def _build_random(spec: str, seed: int) -> tuple[Any, Any, Any, Any, str]:
    """(unet2d, adapter, vae, text encoder, fingerprint) with random weights, deterministic in `seed`."""
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
    fingerprint = f"{spec}-{seed}-{_config_hash(unet_cfg, adapter_cfg, vae_cfg, text_cfg)}"
    return unet2d, adapter, vae, text, fingerprint


# ----------------------------------------------------------------------------------------- real specs

def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a Hub repo, or None when it is not in the local cache.

    Read from the cache layout directly (refs/main, else the newest snapshot): vd needs only some of a
    repo's files, and snapshot_download(local_files_only=True) refuses such a partial snapshot once the
    cache has stored the repo's full file list.
    """
    try:
        from huggingface_hub import constants

        repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        ref = repo_dir / "refs" / "main"
        if ref.is_file():
            snap = repo_dir / "snapshots" / ref.read_text().strip()
            if snap.is_dir():
                return snap
        snaps = sorted((p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        return snaps[-1] if snaps else None
    except Exception:  # a malformed cache folder must not break the lookup
        return None


def _weight_files(folder: Path, subfolders: tuple[str, ...] = ("",)) -> list[Path]:
    files: list[Path] = []
    for sub in subfolders:
        d = folder / sub if sub else folder
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    return files


def _main_weight_file(folder: Path) -> Path | None:
    """The weight file from_pretrained picks in a component folder (full precision first, then fp16)."""
    files = [p for p in _weight_files(folder) if "non_ema" not in p.name]
    rank = lambda p: (".fp16." in p.name, not p.name.endswith(".safetensors"), p.name)  # noqa: E731
    return min(files, key=rank) if files else None


def file_signature(path: Path, nbytes: int = 1 << 20) -> str:
    """Cheap stable identity of a weight file: size + sha256 of its first and last MiB."""
    path = Path(path).resolve()
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(nbytes))
        if size > nbytes:
            fh.seek(max(size - nbytes, nbytes))
            h.update(fh.read(nbytes))
    return h.hexdigest()[:16]


def config_identity(config: dict[str, Any]) -> dict[str, Any]:
    """A config's own settings: bookkeeping keys ("_*": class name, library version, the set-ordered
    `_use_default_values`, the load path; "*_version") dropped, so identity never depends on the process."""
    return {k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")}


def _config_files(folder: Path, subfolders: tuple[str, ...]) -> list[dict[str, Any]]:
    """The raw config.json files of a diffusers folder's components, as written on disk (no defaults added)."""
    out = []
    for sub in subfolders:
        path = folder / sub / "config.json" if sub else folder / "config.json"
        try:
            out.append(config_identity(json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
    return out


def _fingerprint(kind: str, files: list[Path], configs: list[dict[str, Any]]) -> str:
    """Identity of a model from content only: weight-file signatures and the configs' own keys, sorted.

    Never from loaded objects (libraries add process-dependent keys) or file locations.
    """
    h = hashlib.sha256(kind.encode())
    h.update(json.dumps([config_identity(c) for c in configs], sort_keys=True, default=str).encode())
    for p in files:
        component = p.parent.name if p.parent.name in MODEL_SUBFOLDERS else ""  # never location-dependent
        h.update(f"{component}/{p.name}:{file_signature(p)}".encode())
    return f"{kind}-{h.hexdigest()[:16]}"


def _is_sd15_folder(path: Path) -> bool:
    return path.is_dir() and all((path / sub / "config.json").is_file() for sub in MODEL_SUBFOLDERS)


def _from_pretrained(cls: Any, folder: Path, subfolder: str) -> Any:
    """from_pretrained with local files only; falls back to the fp16 variant when only that is present."""
    try:
        return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    except (OSError, EnvironmentError, ValueError) as exc:
        try:
            return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True, variant="fp16")
        except Exception:
            raise ModelMissingError(f"cannot load {subfolder} from {folder}: {first_line(exc)}") from exc


def _load_sd15_folder(folder: Path) -> tuple[Any, Any, Any, Any]:
    """(unet2d, vae, text encoder, tokenizer) from a diffusers SD1.5 folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet2d = _from_pretrained(UNet2DConditionModel, folder, "unet")
    vae = _from_pretrained(AutoencoderKL, folder, "vae")
    text = _from_pretrained(CLIPTextModel, folder, "text_encoder")
    return unet2d, vae, text, _folder_tokenizer(folder)


def _folder_tokenizer(folder: Path | None) -> Any:
    """The folder's CLIP tokenizer when it has one, else the bundled one (same ids)."""
    from stages.models.tokenizer import clip_tokenizer

    if folder is not None and (folder / "tokenizer" / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        try:
            return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        except Exception:
            pass
    return clip_tokenizer()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (safetensors, or a pickle read with weights_only)."""
    from stages.io.weights import read_state_dict

    if not path.is_file():
        raise ModelMissingError(f"weights file not found: {path}")
    return read_state_dict(path)


def _strict_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str, path: Path,
                 ignore_missing: tuple[str, ...] = ()) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(ignore_missing)] if ignore_missing else list(missing)
    if missing or unexpected:
        sample = (missing or unexpected)[0]
        raise InputError(f"{path.name} is not a compatible {what} checkpoint "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {sample})")


def _load_single_file(path: Path, config_dir: Path | None) -> tuple[Any, Any, Any, Any]:
    """(unet2d, vae, text encoder, tokenizer) from a single-file SD1.5 checkpoint in LDM layout.

    Configs come from `config_dir` (an SD1.5 diffusers folder) when given, else from the SD1.5 configs
    shipped in this module, so no Hub access is needed.
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
    ckpt = _read_state_dict(path)
    if not any(k.startswith("model.diffusion_model.") for k in ckpt):
        raise InputError(f"{path.name} is not an SD1.5 single-file checkpoint (no model.diffusion_model.* keys)")

    unet2d = UNet2DConditionModel.from_config(unet_cfg)
    _strict_load(unet2d, convert_ldm_unet_checkpoint(ckpt, unet_cfg), "SD1.5 UNet", path)
    vae = AutoencoderKL.from_config(vae_cfg)
    _strict_load(vae, convert_ldm_vae_checkpoint(ckpt, vae_cfg), "SD1.5 VAE", path)
    text = CLIPTextModel(text_cfg)
    text_sd = convert_ldm_clip_checkpoint(ckpt)
    # "text_model." exists in LDM checkpoints and in transformers 4's CLIPTextModel, not in transformers 5's.
    nested = any(k.startswith("text_model.") for k in text.state_dict())
    text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    if nested:
        text_sd = {f"text_model.{k}": v for k, v in text_sd.items()}
    text_sd = {k: v for k, v in text_sd.items() if not k.endswith("position_ids")}
    _strict_load(text, text_sd, "CLIP text encoder", path)
    return unet2d, vae, text, _folder_tokenizer(config_dir)


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


def _load_adapter(path: Path | None) -> tuple[Any, list[Path], list[dict[str, Any]], str]:
    """(MotionAdapter, weight files, identity configs, source) from a folder, an original .ckpt/.safetensors,
    or the Hub cache."""
    from diffusers import MotionAdapter

    if path is None:
        snap = _hub_snapshot(ADAPTER_REPO)
        if snap is None or not (snap / "config.json").is_file():
            raise ModelMissingError(f"AnimateDiff v3 motion adapter not found: {ADAPTER_GET}")
        path, source = snap, f"hub:{ADAPTER_REPO}"
    else:
        source = str(path)
    if path.is_dir():
        adapter = _from_pretrained(MotionAdapter, path, "")
        main = _main_weight_file(path)
        return adapter, [main] if main else [], _config_files(path, ("",)), source
    if not path.exists():
        raise ModelMissingError(f"motion adapter not found at {path}: {ADAPTER_GET}")
    sd = _read_state_dict(path)
    if any(".temporal_transformer." in k for k in sd):
        sd = convert_original_motion_module(sd)
    config = adapter_config_from_state_dict(sd)
    adapter = MotionAdapter(**config)
    # pos_embed tables are fixed sinusoids; keep diffusers' own when the file has none
    _strict_load(adapter, sd, "AnimateDiff v3 motion module", path, ignore_missing=(".pos_embed.pe",))
    return adapter, [path], [config], source


def _resolve_sd15(spec: str, paths: dict[str, Any]) -> tuple[Path | None, str]:
    """(local path or None for the Hub cache, description) of the SD1.5 weights to use."""
    explicit = paths.get("sd15") or os.environ.get("VD_SD15")
    if spec not in (DEFAULT_SPEC,):
        path = Path(spec).expanduser()
        if not path.exists() and "/" not in spec and os.sep not in spec and not path.suffix:
            raise UsageError(f"unknown model {spec!r}: use {DEFAULT_SPEC}, tiny, sd15-random, an SD1.5 diffusers "
                             "folder or a single-file .safetensors")
        return path, spec
    if explicit:
        return Path(str(explicit)).expanduser(), str(explicit)
    return None, f"hub:{SD15_REPO}"


def _load_real(spec: str, paths: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any, str, dict[str, str]]:
    sd_path, sd_source = _resolve_sd15(spec, paths)
    config_dir = paths.get("sd15_config") or os.environ.get("VD_SD15_CONFIG")
    config_dir = Path(config_dir).expanduser() if config_dir else None
    if sd_path is None:
        snap = _hub_snapshot(SD15_REPO)
        if snap is None or not _is_sd15_folder(snap):
            raise ModelMissingError(f"Stable Diffusion 1.5 not found in the Hugging Face cache: {SD15_GET}")
        sd_path = snap
    if sd_path.is_dir():
        if not _is_sd15_folder(sd_path):
            raise ModelMissingError(f"{sd_path} is not an SD1.5 diffusers folder (needs unet/, vae/, text_encoder/)")
        unet2d, vae, text, tok = _load_sd15_folder(sd_path)
        sd_configs = _config_files(sd_path, MODEL_SUBFOLDERS)
        files = [f for sub in MODEL_SUBFOLDERS if (f := _main_weight_file(sd_path / sub)) is not None]
    elif sd_path.is_file():
        if config_dir is None:
            snap = _hub_snapshot(SD15_REPO)
            config_dir = snap if snap is not None and _is_sd15_folder(snap) else None
        unet2d, vae, text, tok = _load_single_file(sd_path, config_dir)
        sd_configs = (_config_files(config_dir, MODEL_SUBFOLDERS) if config_dir is not None
                      else [SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG])
        files = [sd_path]
    else:
        raise ModelMissingError(f"SD1.5 weights not found at {sd_path}: {SD15_GET}")
    adapter_path = paths.get("motion_adapter") or os.environ.get("VD_MOTION_ADAPTER")
    adapter, adapter_files, adapter_configs, adapter_source = _load_adapter(Path(str(adapter_path)).expanduser() if adapter_path else None)
    configs = sd_configs + adapter_configs
    fingerprint = _fingerprint("sd15-animatediff", files + adapter_files, configs)
    return unet2d, adapter, vae, text, tok, fingerprint, {"sd15": sd_source, "motion_adapter": adapter_source}


# ------------------------------------------------------------------------------------------ public API

def load_models(spec: str = DEFAULT_SPEC, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                per_frame_groupnorm: bool = True, seed: int = TINY_SEED, **paths: Any) -> Models:
    """Build or load the components for `spec` and return them frozen, in eval mode, on `device`.

    spec: "tiny", "sd15-random", "sd15-animatediff-v3", a diffusers SD1.5 folder or a single-file SD1.5
    checkpoint. paths: sd15=..., motion_adapter=..., sd15_config=... (override VD_SD15, VD_MOTION_ADAPTER,
    VD_SD15_CONFIG). Missing weights raise ModelMissingError with a one-line hint on how to get them.
    """
    from diffusers import UNetMotionModel

    dev = resolve_device(device)
    cdtype = resolve_dtype(dtype, dev)
    spec = str(spec)
    if spec in RANDOM_SPECS:
        unet2d, adapter, vae, text, fingerprint = _build_random(spec, seed)
        from stages.models.tokenizer import clip_tokenizer

        tok, sources = clip_tokenizer(), {"weights": f"random (seed {seed})"}
    else:
        unet2d, adapter, vae, text, tok, fingerprint, sources = _load_real(spec, paths)
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # from_unet2d's dtype .to() warns about nothing ("kept in float32: []")
    try:
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    finally:
        dlogging.set_verbosity(level)
    set_motion_groups(unet, int(adapter.config.motion_norm_num_groups))
    del unet2d, adapter
    set_per_frame_groupnorm(unet, per_frame_groupnorm)
    # UNet weights in the compute dtype on GPU (autocast then has nothing to cast); VAE and text in fp32.
    unet_dtype = cdtype if dev.type == "cuda" else torch.float32
    for model, want in ((unet, unet_dtype), (vae, torch.float32), (text, torch.float32)):
        if next(model.parameters()).dtype != want:  # diffusers warns on every dtype .to(), even a no-op
            model.to(dtype=want)
        model.to(device=dev)
    for model in (unet, vae, text):
        model.requires_grad_(False)
        model.eval()
    return Models(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, spec=spec, fingerprint=fingerprint,
                  device=dev, dtype=cdtype, per_frame_groupnorm=per_frame_groupnorm, sources=sources)


def _autocast(models: Models):
    enabled = models.dtype != torch.float32
    return torch.autocast(device_type=models.device.type, dtype=models.dtype, enabled=enabled)


@torch.no_grad()
def encode_text(models: Models, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden states (N, 77, D) float32 for prompts padded (with EOS) / truncated to 77 tokens."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = models.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids.to(models.device)
    return models.text_encoder(ids).last_hidden_state.float()


@torch.no_grad()
def vae_encode(models: Models, frames: np.ndarray, seed: int = 42, chunk: int = 4) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) -> posterior SAMPLE (F, 4, H/8, W/8) x 0.18215, float32 (ALGORITHM.md §1.3).

    Moments are computed in chunks of frames; the noise is drawn once for all frames from a generator
    seeded with `seed` on the model device, as a one-batch encode would.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 8 or frames.shape[2] % 8:
        raise InputError(f"frame size {frames.shape[1]}x{frames.shape[2]} must be a multiple of 8")
    x = torch.from_numpy(frames).to(models.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    moments = torch.cat([models.vae.encode(x[i:i + chunk]).latent_dist.parameters
                         for i in range(0, len(x), chunk)])
    gen = torch.Generator(device=models.device).manual_seed(seed)
    latents = DiagonalGaussianDistribution(moments).sample(generator=gen)
    return (latents * models.vae.config.scaling_factor).float()


@torch.no_grad()
def vae_decode(models: Models, latents: torch.Tensor) -> np.ndarray:
    """Latents (F, 4, h, w) -> uint8 frames (F, 8h, 8w, 3), decoded one frame at a time, rounded."""
    out = []
    for z in latents:
        z = z[None].to(models.device, torch.float32) / models.vae.config.scaling_factor
        img = models.vae.decode(z).sample
        img = (img / 2 + 0.5).clamp(0, 1)
        out.append((img[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy())
    return np.stack(out)


_TIMESTEPS: dict[tuple[str, int], torch.Tensor] = {}


def _timestep(device: torch.device, t: int) -> torch.Tensor:
    """The 0-d long timestep tensor on `device`, made once per (device, t): building it from a Python int
    is a blocking host-to-device copy on CUDA, once per UNet call otherwise."""
    key = (str(device), t)
    if key not in _TIMESTEPS:
        _TIMESTEPS[key] = torch.tensor(t, device=device, dtype=torch.long)
    return _TIMESTEPS[key]


def unet_eps(models: Models, z: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    """Noise prediction (B, F, 4, h, w) float32 for latents (B, F, 4, h, w) at timestep t.

    emb: (B*F, 77, D), batch-major and frame-minor (row b*F + f conditions frame f of clip b). Runs under
    autocast in models.dtype when that is not float32; gradients flow when the caller enables them.
    """
    if z.ndim != 5:
        raise ValueError(f"z must be (B, F, 4, h, w), got {tuple(z.shape)}")
    b, f = z.shape[:2]
    if emb.shape[0] != b * f:
        raise ValueError(f"emb must have B*F = {b * f} rows, got {emb.shape[0]}")
    if f > models.max_frames:
        raise InputError(f"{f} frames exceed the motion module's maximum of {models.max_frames}")
    sample = z.to(models.device).permute(0, 2, 1, 3, 4)
    timestep = _timestep(models.device, int(t))
    with _autocast(models):
        out = models.unet(sample, timestep, encoder_hidden_states=emb.to(models.device)).sample
    return out.float().permute(0, 2, 1, 3, 4)


# ----------------------------------------------------------------------------------- what is present

def _sd15_folder_state(folder: Path) -> str | None:
    """None when `folder` is a loadable SD1.5 diffusers folder, else what is missing."""
    if not folder.is_dir():
        return "not a folder"
    for sub in MODEL_SUBFOLDERS:
        if not (folder / sub / "config.json").is_file():
            return f"{sub}/config.json missing"
        if not _weight_files(folder, (sub,)):
            return f"{sub} weights missing"
    return None


def _component(name: str, present: bool, path: Path | str | None, source: str, get: str, **extra: Any) -> dict:
    return {"name": name, "present": bool(present), "path": str(path) if path else None, "source": source,
            "get": None if present else get, **extra}


def _sd15_status(paths: dict[str, Any]) -> dict[str, Any]:
    explicit = paths.get("sd15") or os.environ.get("VD_SD15")
    hub = {"hub_id": SD15_REPO, "used_by": "vd invert, vd edit (default model)"}
    if explicit:
        p = Path(str(explicit)).expanduser()
        problem = "not found" if not p.exists() else (None if p.is_file() else _sd15_folder_state(p))
        return _component("sd15", problem is None, p, "VD_SD15" if not paths.get("sd15") else "argument",
                          f"VD_SD15={p}: {problem}; {SD15_GET}", **hub)
    snap = _hub_snapshot(SD15_REPO)
    problem = "not in the Hugging Face cache" if snap is None else _sd15_folder_state(snap)
    return _component("sd15", problem is None, snap if problem is None else None, "hf-cache", SD15_GET, **hub)


def _adapter_status(paths: dict[str, Any]) -> dict[str, Any]:
    explicit = paths.get("motion_adapter") or os.environ.get("VD_MOTION_ADAPTER")
    hub = {"hub_id": ADAPTER_REPO, "url": V3_CKPT_URL, "used_by": "vd invert, vd edit (default model)"}
    if explicit:
        p = Path(str(explicit)).expanduser()
        ok = p.is_file() or (p.is_dir() and (p / "config.json").is_file() and bool(_weight_files(p)))
        return _component("motion_adapter", ok, p, "VD_MOTION_ADAPTER" if not paths.get("motion_adapter")
                          else "argument", f"VD_MOTION_ADAPTER={p} is not usable; {ADAPTER_GET}", **hub)
    snap = _hub_snapshot(ADAPTER_REPO)
    ok = snap is not None and (snap / "config.json").is_file() and bool(_weight_files(snap))
    return _component("motion_adapter", ok, snap if ok else None, "hf-cache", ADAPTER_GET, **hub)


def _sam2_status() -> list[dict[str, Any]]:
    try:
        from stages.models.sam2_track import SAM2_CHECKPOINTS, find_sam2_checkpoint
    except ImportError as exc:  # the mask stage is optional for listing
        return [_component("sam2", False, None, "none", f"SAM2 support unavailable ({exc})",
                           used_by="vd mask --point/--box with SAM2")]
    try:
        from stages.models.sam2_track import how_to_get
    except ImportError:
        how_to_get = None
    out = []
    for name, ckpt in SAM2_CHECKPOINTS.items():
        found = find_sam2_checkpoint(name)
        url, hub_id = getattr(ckpt, "url", None), getattr(ckpt, "hub_id", None)
        get = how_to_get(name) if how_to_get else f"download {url}"
        out.append(_component(f"sam2-{name}", found is not None, found, "local", get, hub_id=hub_id, url=url,
                              used_by=f"vd mask --sam2 {name}"))
    return out


def _tokenizer_status() -> dict[str, Any]:
    try:
        from stages.models.tokenizer import bpe_path

        path, ok = bpe_path(), True
    except ModelMissingError:
        path, ok = None, False
    return _component("clip-bpe", ok, path, "open-clip-torch", "pip install open-clip-torch",
                      used_by="tokenizer of tiny and single-file models")


def models_status(**paths: Any) -> dict[str, Any]:
    """Which weights are present locally and how to get the missing ones (nothing is loaded or downloaded).

    Returns {"components": [...], "specs": {spec: ready}, "env": {...}}; each component has name, present,
    path, source, get (how to obtain it when missing), and hub_id / url / used_by where they apply.
    """
    sd15, adapter = _sd15_status(paths), _adapter_status(paths)
    comps = [sd15, adapter, _tokenizer_status(), *_sam2_status()]
    env = {k: os.environ.get(k) for k in ("VD_SD15", "VD_MOTION_ADAPTER", "VD_SD15_CONFIG", "VD_SAM2_DIR",
                                          "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        env["hf_cache"] = str(HF_HUB_CACHE)
    except ImportError:
        pass
    specs = {"tiny": comps[2]["present"], DEFAULT_SPEC: sd15["present"] and adapter["present"]}
    return {"components": comps, "specs": specs, "env": env}
