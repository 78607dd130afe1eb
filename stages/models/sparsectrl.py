"""AnimateDiff SparseCtrl RGB (`guoyww/animatediff-sparsectrl-rgb`, diffusers SparseControlNetModel) for
`vd edit --first-frame`: where its weights are, loading them, and a tiny random one for the "tiny" spec.

No SparseCtrl weights exist for the tiny model, so a workspace inverted with `--model tiny` gets a random one
("tiny-random", seeded, untrained: it proves the plumbing, its conditioning means nothing) unless
$VD_SPARSECTRL names a folder explicitly.

The RGB variant conditions on VAE latents (`use_simplified_condition_embedding`: 4 latent channels plus the
per-frame condition mask). Its input sample is ignored (diffusers zeroes it), so its residuals depend only on
the timestep, the text embeddings and the condition. Import-light: torch and diffusers load inside functions,
so `vd models` can list the weights without them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.errors import InputError, ModelMissingError, first_line
from stages.models import catalog
from stages.models.catalog import ENV_SPARSECTRL, SPARSECTRL_GET, SPARSECTRL_REPO, TARGETS
from stages.models.resolve import component, require_component

NAME = "sparsectrl-rgb"  # the `vd models --get` target
RANDOM = "tiny-random"  # the name of the random SparseCtrl in every output (attrs, --json, logs)
RANDOM_SEED = 0
HINT = f"vd models --get {NAME}, or {SPARSECTRL_GET}"


@dataclass
class SparseCtrl:
    """A loaded SparseCtrl RGB: the frozen model, where it came from and its weight identity."""

    model: Any  # diffusers SparseControlNetModel (eval, no grad)
    source: str
    fingerprint: str


def sparsectrl_config(unet_config: dict[str, Any], adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The SparseControlNetModel config (RGB kind) matching a UNet config and a MotionAdapter config."""
    down = ["CrossAttnDownBlockMotion" if "CrossAttn" in t else "DownBlockMotion"
            for t in unet_config["down_block_types"]]
    keys = ("in_channels", "flip_sin_to_cos", "freq_shift", "block_out_channels", "layers_per_block",
            "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
            "cross_attention_dim", "attention_head_dim")
    return {**{k: unet_config[k] for k in keys}, "down_block_types": down, "conditioning_channels": 4,
            "motion_max_seq_length": adapter_config["motion_max_seq_length"],
            "motion_num_attention_heads": adapter_config["motion_num_attention_heads"],
            "concat_conditioning_mask": True, "use_simplified_condition_embedding": True}


def tiny_sparsectrl(seed: int = 0) -> Any:
    """A random SparseControlNetModel shaped for the "tiny" spec, deterministic in `seed`; the zero-initialised
    layers (condition embedding, residual convs, motion proj_out) get small random weights so it acts."""
    import torch
    from diffusers import SparseControlNetModel

    from stages.models.configs import TINY_ADAPTER_CONFIG, TINY_UNET_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SparseControlNetModel(**sparsectrl_config(TINY_UNET_CONFIG, TINY_ADAPTER_CONFIG))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            zeroed = name.startswith(("controlnet_cond_embedding", "controlnet_down_blocks.", "controlnet_mid_block"))
            if zeroed or name.endswith("motion_modules.0.proj_out") or name.endswith("motion_modules.1.proj_out"):
                if getattr(mod, "weight", None) is not None:
                    fan_in = mod.weight[0].numel()
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.5 / fan_in ** 0.5)
                    if mod.bias is not None:
                        mod.bias.zero_()
    return model.eval().requires_grad_(False)


def uses_random(spec: str | None) -> bool:
    """Whether an edit of a workspace inverted with model `spec` gets the tiny random SparseCtrl: the "tiny"
    spec (no weights fit it) without an explicit $VD_SPARSECTRL."""
    return spec == "tiny" and not os.environ.get(ENV_SPARSECTRL)


def random_sparsectrl(models: Any, seed: int = RANDOM_SEED) -> SparseCtrl:
    """The tiny random SparseCtrl (`tiny_sparsectrl(seed)`) on the models' device, named "tiny-random"."""
    import torch

    dtype = next(models.unet.parameters()).dtype if models.device.type == "cuda" else torch.float32
    model = tiny_sparsectrl(seed).to(device=models.device, dtype=dtype)  # as load_sparsectrl places it
    return SparseCtrl(model, RANDOM, f"sparsectrl-{RANDOM}-seed{seed}")


# ------------------------------------------------------------------------------------------ locating

def locate(path: str | Path | None = None) -> tuple[Path, str]:
    """(folder, source) of the SparseCtrl RGB weights: `path`, else $VD_SPARSECTRL, else the Hugging Face
    cache. ModelMissingError (exit 4) with how to get them when absent. Nothing is read or loaded."""
    explicit = path or os.environ.get(ENV_SPARSECTRL)
    if explicit:
        folder = Path(str(explicit)).expanduser()
        if not (folder / "config.json").is_file() or component(folder) is None:
            raise ModelMissingError(f"{folder} is not a SparseControlNetModel folder (config.json and "
                                    f"diffusion_pytorch_model.safetensors): {HINT}")
        return folder, str(folder) if path else f"{ENV_SPARSECTRL}={folder}"
    snap = catalog.hub_folder(SPARSECTRL_REPO, TARGETS[NAME])
    if snap is None:
        raise ModelMissingError(f"SparseCtrl RGB weights not found: {HINT}")
    return snap, f"hub:{SPARSECTRL_REPO}"


def sparsectrl_status() -> dict[str, Any]:
    """The `vd models` component of the SparseCtrl RGB weights (same keys as the other components)."""
    try:
        folder, source = locate()
        present, where = True, str(folder)
    except ModelMissingError:
        present, where, source = False, None, ENV_SPARSECTRL if os.environ.get(ENV_SPARSECTRL) else "hf-cache"
    return {"name": NAME, "present": present, "path": where, "source": source,
            "get": None if present else SPARSECTRL_GET, "hub_id": SPARSECTRL_REPO,
            "used_by": "vd edit --first-frame"}


# ------------------------------------------------------------------------------------------ loading

def check_compatible(config: dict[str, Any], unet: Any, where: str) -> None:
    """InputError unless a SparseCtrl config is the RGB kind and its widths fit the loaded UNet."""
    if not config.get("use_simplified_condition_embedding") or int(config.get("conditioning_channels", 0)) != 4:
        raise InputError(f"{where} is not a SparseCtrl RGB model (it conditions on "
                         f"{config.get('conditioning_channels')} image channels, not VAE latents)")
    want = {"block_out_channels": list(unet.config.block_out_channels),
            "cross_attention_dim": unet.config.cross_attention_dim,
            "layers_per_block": unet.config.layers_per_block}
    for key, value in want.items():
        have = list(config.get(key) or []) if key == "block_out_channels" else config.get(key)
        if have != value:
            raise InputError(f"the SparseCtrl weights in {where} do not fit the model ({key} {have}, "
                             f"the UNet has {value})")


def load_sparsectrl(models: Any, path: str | Path | None = None) -> SparseCtrl:
    """Load SparseCtrl RGB (see `locate`) frozen, on the models' device, in the UNet's weight dtype.

    ModelMissingError when absent, InputError when it cannot be read or does not fit `models.unet`."""
    import torch
    from diffusers import SparseControlNetModel
    from diffusers.utils import logging as dlogging

    from stages.models.identity import config_files, fingerprint

    folder, source = locate(path)
    config = config_files(folder, ("",))[0]
    check_compatible(config, models.unet, str(folder))
    weights = require_component(folder)  # the files from_pretrained reads: loading and identity alike
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        model = SparseControlNetModel.from_pretrained(folder, local_files_only=True, variant=weights.variant)
    except Exception as exc:
        raise InputError(f"cannot load SparseCtrl from {folder}: {first_line(exc)}") from None
    finally:
        dlogging.set_verbosity(level)
    want = next(models.unet.parameters()).dtype if models.device.type == "cuda" else torch.float32
    if next(model.parameters()).dtype != want:  # diffusers warns on every dtype .to(), even a no-op
        model.to(dtype=want)
    model.to(device=models.device)
    model.requires_grad_(False).eval()
    identity = fingerprint("sparsectrl-rgb", list(weights.files), [config])
    return SparseCtrl(model, source, identity)
