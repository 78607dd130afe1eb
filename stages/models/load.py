"""Model specs -> frozen components (UNetMotionModel, VAE, CLIP text encoder, tokenizer).

Specs:
- "tiny": SD1.5-shaped components with random weights built from configs with a fixed seed (offline,
  seconds on CPU), kept in a sane numeric regime (stages.models.random_specs).
- "sd15-random": the full SD1.5 + AnimateDiff v3 architecture with random weights (benchmarks).
- "sd15-animatediff-v3": SD1.5 + AnimateDiff v3 motion adapter from the Hugging Face cache (or VD_SD15 /
  VD_MOTION_ADAPTER / keyword paths): a diffusers folder, an SD1.5 single-file .safetensors, and a
  diffusers MotionAdapter folder or the original `v3_sd15_mm.ckpt`.
- a path: a local diffusers SD1.5 folder or a single-file SD1.5 checkpoint (motion adapter as above).

The motion modules normalise per frame by default (ALGORITHM.md decision 4, `per_frame_groupnorm`).
What runs on the loaded components is in stages.models.ops.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from stages.common.errors import ModelMissingError, UsageError, first_line
from stages.models import catalog
from stages.models.catalog import (ADAPTER_GET, ADAPTER_REPO, DEFAULT_SPEC, ENV_MOTION_ADAPTER, ENV_SD15,
                                   ENV_SD15_CONFIG, MODEL_SUBFOLDERS, SD15_GET, SD15_REPO)
from stages.models.configs import RANDOM_SPECS, SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, TINY_SEED
from stages.models.formats import adapter_from_file, folder_tokenizer, load_single_file
from stages.models.identity import config_files, fingerprint
from stages.models.layout import is_sd15_folder, main_weight_file
from stages.models.ops import Models, resolve_device, resolve_dtype
from stages.models.patches import set_motion_groups, set_per_frame_groupnorm


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
    return unet2d, vae, text, folder_tokenizer(folder)


def _load_adapter(path: Path | None) -> tuple[Any, list[Path], list[dict[str, Any]], str]:
    """(MotionAdapter, weight files, identity configs, source) from a folder, an original .ckpt/.safetensors,
    or the Hub cache."""
    from diffusers import MotionAdapter

    if path is None:
        snap = catalog.hub_snapshot(ADAPTER_REPO)
        if snap is None or not (snap / "config.json").is_file():
            raise ModelMissingError(f"AnimateDiff v3 motion adapter not found: {ADAPTER_GET}")
        path, source = snap, f"hub:{ADAPTER_REPO}"
    else:
        source = str(path)
    if path.is_dir():
        adapter = _from_pretrained(MotionAdapter, path, "")
        main = main_weight_file(path)
        return adapter, [main] if main else [], config_files(path, ("",)), source
    if not path.exists():
        raise ModelMissingError(f"motion adapter not found at {path}: {ADAPTER_GET}")
    adapter, config = adapter_from_file(path)
    return adapter, [path], [config], source


def _resolve_sd15(spec: str, paths: dict[str, Any]) -> tuple[Path | None, str]:
    """(local path or None for the Hub cache, description) of the SD1.5 weights to use."""
    explicit = paths.get("sd15") or os.environ.get(ENV_SD15)
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
    config_dir = paths.get("sd15_config") or os.environ.get(ENV_SD15_CONFIG)
    config_dir = Path(config_dir).expanduser() if config_dir else None
    if sd_path is None:
        snap = catalog.hub_snapshot(SD15_REPO)
        if snap is None or not is_sd15_folder(snap):
            raise ModelMissingError(f"Stable Diffusion 1.5 not found in the Hugging Face cache: {SD15_GET}")
        sd_path = snap
    if sd_path.is_dir():
        if not is_sd15_folder(sd_path):
            raise ModelMissingError(f"{sd_path} is not an SD1.5 diffusers folder (needs unet/, vae/, text_encoder/)")
        unet2d, vae, text, tok = _load_sd15_folder(sd_path)
        sd_configs = config_files(sd_path, MODEL_SUBFOLDERS)
        files = [f for sub in MODEL_SUBFOLDERS if (f := main_weight_file(sd_path / sub)) is not None]
    elif sd_path.is_file():
        if config_dir is None:
            snap = catalog.hub_snapshot(SD15_REPO)
            config_dir = snap if snap is not None and is_sd15_folder(snap) else None
        unet2d, vae, text, tok = load_single_file(sd_path, config_dir)
        sd_configs = (config_files(config_dir, MODEL_SUBFOLDERS) if config_dir is not None
                      else [SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG])
        files = [sd_path]
    else:
        raise ModelMissingError(f"SD1.5 weights not found at {sd_path}: {SD15_GET}")
    adapter_path = paths.get("motion_adapter") or os.environ.get(ENV_MOTION_ADAPTER)
    adapter, adapter_files, adapter_configs, adapter_source = _load_adapter(
        Path(str(adapter_path)).expanduser() if adapter_path else None)
    identity = fingerprint("sd15-animatediff", files + adapter_files, sd_configs + adapter_configs)
    return unet2d, adapter, vae, text, tok, identity, {"sd15": sd_source, "motion_adapter": adapter_source}


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
        from stages.models.random_specs import build_random
        from stages.models.tokenizer import clip_tokenizer

        unet2d, adapter, vae, text, identity = build_random(spec, seed)
        tok, sources = clip_tokenizer(), {"weights": f"random (seed {seed})"}
    else:
        unet2d, adapter, vae, text, tok, identity, sources = _load_real(spec, paths)
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
    return Models(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, spec=spec, fingerprint=identity,
                  device=dev, dtype=cdtype, per_frame_groupnorm=per_frame_groupnorm, sources=sources)
