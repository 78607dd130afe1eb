"""The identity of a model spec found without building the model: the weight files and configs
load_models would use (the same resolution: spec, VD_SD15, VD_SD15_CONFIG, VD_MOTION_ADAPTER, the Hugging
Face cache), fingerprinted by stages.models.identity. `vd batch` compares it with a stored inversion's
before deciding to skip it, so a rerun of a finished batch loads no model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stages.common.errors import ModelMissingError
from stages.models import catalog
from stages.models.catalog import (ADAPTER_GET, ADAPTER_REPO, ENV_MOTION_ADAPTER, ENV_SD15_CONFIG, MODEL_SUBFOLDERS,
                                   SD15_GET, SD15_REPO)
from stages.models.configs import RANDOM_SPECS, SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, TINY_SEED
from stages.models.formats import adapter_config_from_state_dict, convert_original_motion_module, read_state_dict
from stages.models.identity import config_files, file_sha256, fingerprint, random_fingerprint
from stages.models.layout import is_sd15_folder, main_weight_file
from stages.models.load import _resolve_sd15  # the one rule for which SD1.5 weights a spec means

_ADAPTER_CONFIGS: dict[str, dict[str, Any]] = {}  # file sha256 -> config read from an adapter weights file


def _adapter_file_config(path: Path) -> dict[str, Any]:
    """The MotionAdapter config load_models reads from an adapter weights file (cached by content)."""
    sha = file_sha256(path)
    if sha not in _ADAPTER_CONFIGS:
        sd = read_state_dict(path)
        if any(".temporal_transformer." in k for k in sd):
            sd = convert_original_motion_module(sd)
        _ADAPTER_CONFIGS[sha] = adapter_config_from_state_dict(sd)
    return _ADAPTER_CONFIGS[sha]


def model_identity(spec: str, seed: int | None = None, **paths: Any) -> str:
    """The fingerprint `load_models(spec, seed=seed, **paths)` gives its Models, found without building the
    model: the same weight files and configs are resolved (VD_SD15, VD_MOTION_ADAPTER, the Hub cache, ...).
    Raises ModelMissingError / UsageError as load_models does when the weights are not there."""
    spec = str(spec)
    if spec in RANDOM_SPECS:
        return random_fingerprint(spec, TINY_SEED if seed is None else int(seed), tuple(RANDOM_SPECS[spec]))
    sd_path, _ = _resolve_sd15(spec, paths)
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
        configs = config_files(sd_path, MODEL_SUBFOLDERS)
        files = [f for sub in MODEL_SUBFOLDERS if (f := main_weight_file(sd_path / sub)) is not None]
    elif sd_path.is_file():
        if config_dir is None:
            snap = catalog.hub_snapshot(SD15_REPO)
            config_dir = snap if snap is not None and is_sd15_folder(snap) else None
        configs = (config_files(config_dir, MODEL_SUBFOLDERS) if config_dir is not None
                   else [SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG])
        files = [sd_path]
    else:
        raise ModelMissingError(f"SD1.5 weights not found at {sd_path}: {SD15_GET}")
    adapter = paths.get("motion_adapter") or os.environ.get(ENV_MOTION_ADAPTER)
    path = Path(str(adapter)).expanduser() if adapter else catalog.hub_snapshot(ADAPTER_REPO)
    if path is None or (not adapter and not (path / "config.json").is_file()):
        raise ModelMissingError(f"AnimateDiff v3 motion adapter not found: {ADAPTER_GET}")
    if path.is_dir():
        main = main_weight_file(path)
        files += [main] if main else []
        configs += config_files(path, ("",))
    elif path.exists():
        files.append(path)
        configs.append(_adapter_file_config(path))
    else:
        raise ModelMissingError(f"motion adapter not found at {path}: {ADAPTER_GET}")
    return fingerprint("sd15-animatediff", files, configs)
