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

from pathlib import Path
from typing import Any

import torch

from stages.common.errors import ModelMissingError, first_line
from stages.models.catalog import DEFAULT_SPEC
from stages.models.configs import RANDOM_SPECS, TINY_SEED
from stages.models.formats import adapter_from_file, folder_tokenizer, load_single_file
from stages.models.ops import Models, host_device, resolve_device, resolve_dtype
from stages.models.patches import set_motion_groups, set_per_frame_groupnorm
from stages.models.resolve import require_component, resolve_weights


def _from_pretrained(cls: Any, folder: Path, subfolder: str) -> Any:
    """from_pretrained with local files only, of the variant whose files the model identity hashed
    (stages.models.resolve.component: full precision, else fp16)."""
    part = require_component(folder, subfolder)
    try:
        return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True, variant=part.variant)
    except (OSError, ValueError) as exc:
        raise ModelMissingError(f"cannot load {subfolder or 'the motion adapter'} from {folder}: "
                                f"{first_line(exc)}") from exc


def _load_sd15_folder(folder: Path) -> tuple[Any, Any, Any, Any]:
    """(unet2d, vae, text encoder, tokenizer) from a diffusers SD1.5 folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet2d = _from_pretrained(UNet2DConditionModel, folder, "unet")
    vae = _from_pretrained(AutoencoderKL, folder, "vae")
    text = _from_pretrained(CLIPTextModel, folder, "text_encoder")
    return unet2d, vae, text, folder_tokenizer(folder)


def _load_real(spec: str, paths: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any, str, dict[str, str]]:
    """(unet2d, adapter, vae, text, tokenizer, identity, sources) of the weights `spec` resolves to."""
    from diffusers import MotionAdapter

    weights = resolve_weights(spec, paths)
    if weights.sd15_is_folder:
        unet2d, vae, text, tok = _load_sd15_folder(weights.sd15)
    else:
        unet2d, vae, text, tok = load_single_file(weights.sd15, weights.config_dir)
    file_config = None
    if weights.adapter.is_dir():
        adapter = _from_pretrained(MotionAdapter, weights.adapter, "")
    else:
        adapter, file_config = adapter_from_file(weights.adapter)
    sources = {"sd15": weights.sd15_source, "motion_adapter": weights.adapter_source}
    return unet2d, adapter, vae, text, tok, weights.identity(file_config), sources


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
    # UNet weights in the compute dtype on GPU (autocast then has nothing to cast); VAE and text in fp32, in
    # host memory on a GPU except during their own calls (ops.on_device)
    unet_dtype = cdtype if dev.type == "cuda" else torch.float32
    for model, want, where in ((unet, unet_dtype, dev), (vae, torch.float32, host_device(dev)),
                               (text, torch.float32, host_device(dev))):
        if next(model.parameters()).dtype != want:  # diffusers warns on every dtype .to(), even a no-op
            model.to(dtype=want)
        model.to(device=where)
    for model in (unet, vae, text):
        model.requires_grad_(False)
        model.eval()
    return Models(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, spec=spec, fingerprint=identity,
                  device=dev, dtype=cdtype, per_frame_groupnorm=per_frame_groupnorm, sources=sources)
