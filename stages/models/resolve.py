"""Which weight files and configs a model spec means: the one resolution rule that loading (stages.models.load)
and identity without loading (`model_identity`, used by `vd batch` to skip finished work) share.

Order: the spec itself when it is a path, else VD_SD15 / sd15=, else the Hugging Face cache; a single-file
checkpoint takes its configs from VD_SD15_CONFIG / sd15_config=, else the cached SD1.5 folder, else the
built-in SD1.5 configs. The motion adapter: VD_MOTION_ADAPTER / motion_adapter=, else the Hugging Face cache.

Inside a diffusers folder, `component` picks the files from_pretrained reads, by the libraries' own rule
(diffusers 0.42 `ModelMixin.from_pretrained`, transformers 5 `_get_resolved_checkpoint_files`, local folder,
default use_safetensors): a sharded safetensors index, else the safetensors file, else the .bin (transformers:
its .bin index too); the full-precision files first, then the "fp16" variant. Any other file in the folder
(a `.orig.safetensors` backup, `non_ema` weights, a stray .ckpt) is never read, so it never counts.
load_models passes the chosen variant to from_pretrained: identity and loading read the same files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.digest import file_sha256
from stages.common.errors import ModelMissingError, UsageError
from stages.models import catalog
from stages.models.catalog import (ADAPTER_GET, ADAPTER_REPO, DEFAULT_SPEC, ENV_MOTION_ADAPTER, ENV_SD15,
                                   ENV_SD15_CONFIG, MODEL_SUBFOLDERS, SD15_GET, SD15_REPO)
from stages.models.configs import RANDOM_SPECS, SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, TINY_SEED
from stages.models.identity import config_files, fingerprint, random_fingerprint
from stages.models.layout import is_sd15_folder

IDENTITY_KIND = "sd15-animatediff"
VARIANTS = (None, "fp16")  # the order load_models tries: full precision, then the fp16 files alone
TRANSFORMERS_SUBFOLDERS = ("text_encoder",)  # loaded by transformers; every other component by diffusers


# ------------------------------------------------------------------------------------- component files

@dataclass(frozen=True)
class Component:
    """A model component in a diffusers-style folder: what from_pretrained is given and the files it reads."""

    folder: Path
    subfolder: str
    variant: str | None
    files: tuple[Path, ...]  # the weight files read (shards in name order, then their index)


def _add_variant(name: str, variant: str | None) -> str:
    """The libraries' `_add_variant` (diffusers and transformers agree): the variant goes before the last suffix."""
    if variant is None:
        return name
    head, _, last = name.rpartition(".")
    return f"{head}.{variant}.{last}"


def _sharded(index: Path) -> tuple[Path, ...] | None:
    """The shards an index file names (as from_pretrained reads them) followed by the index; None if unreadable."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if any(Path(n).name != n for n in names):
        return None
    return tuple(index.parent / n for n in names) + (index,)


def _diffusers_files(folder: Path, subfolder: str, variant: str | None) -> tuple[Path, ...] | None:
    """What diffusers' ModelMixin.from_pretrained(folder, subfolder=..., variant=...) reads, or None."""
    base = folder / subfolder if subfolder else folder
    indexes = [base / _add_variant("diffusion_pytorch_model.safetensors.index.json", variant)]
    if variant is not None:  # the older "<name>.safetensors.<variant>.index.json" of sharded variants
        indexes.append(base / f"diffusion_pytorch_model.safetensors.{variant}.index.json")
    for index in indexes:
        if index.is_file():
            return _sharded(index)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        name = _add_variant(name, variant)
        # diffusers looks in the top folder before the subfolder (hub_utils._get_model_file)
        for candidate in (folder / name, base / name):
            if candidate.is_file():
                return (candidate,)
    return None


def _transformers_files(folder: Path, subfolder: str, variant: str | None) -> tuple[Path, ...] | None:
    """What transformers' PreTrainedModel.from_pretrained(folder, subfolder=..., variant=...) reads, or None."""
    base = folder / subfolder if subfolder else folder
    try:
        explicit = json.loads((base / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None
    if isinstance(explicit, str) and explicit:
        path = base / explicit
        if explicit.endswith(".index.json"):
            return _sharded(path) if path.is_file() else None
        return (path,) if path.is_file() else None
    for name, index in (("model.safetensors", False), ("model.safetensors.index.json", True),
                        ("pytorch_model.bin", False), ("pytorch_model.bin.index.json", True)):
        path = base / _add_variant(name, variant)
        if path.is_file():
            return _sharded(path) if index else (path,)
    return None


def component(folder: Path, subfolder: str = "") -> Component | None:
    """The files from_pretrained loads for `subfolder` of a diffusers-style `folder` (the variant load_models
    passes included), or None when there are none: the one rule loading and identity share."""
    folder = Path(folder)
    find = _transformers_files if subfolder in TRANSFORMERS_SUBFOLDERS else _diffusers_files
    for variant in VARIANTS:
        files = find(folder, subfolder, variant)
        if files:
            return Component(folder, subfolder, variant, files)
    return None


def require_component(folder: Path, subfolder: str = "") -> Component:
    """`component`, or ModelMissingError naming the folder."""
    found = component(folder, subfolder)
    if found is None:
        where = Path(folder) / subfolder if subfolder else Path(folder)
        raise ModelMissingError(f"no weights that diffusers loads in {where} (diffusion_pytorch_model.safetensors, "
                                "model.safetensors, .bin or their fp16 variants)")
    return found


@dataclass
class Weights:
    """The resolved SD1.5 weights (a diffusers folder or one checkpoint file) and motion adapter."""

    sd15: Path
    sd15_source: str
    config_dir: Path | None  # configs for a single-file checkpoint (None: the built-in SD1.5 configs)
    adapter: Path  # a MotionAdapter folder or an original/converted weights file
    adapter_source: str

    @property
    def sd15_is_folder(self) -> bool:
        return self.sd15.is_dir()

    def sd15_parts(self) -> tuple[list[Path], list[dict[str, Any]]]:
        """(weight files, identity configs) of the SD1.5 components."""
        if self.sd15_is_folder:
            files = [f for sub in MODEL_SUBFOLDERS for f in require_component(self.sd15, sub).files]
            return files, config_files(self.sd15, MODEL_SUBFOLDERS)
        configs = (config_files(self.config_dir, MODEL_SUBFOLDERS) if self.config_dir is not None
                   else [SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG])
        return [self.sd15], configs

    def adapter_parts(self, file_config: dict[str, Any] | None = None) -> tuple[list[Path], list[dict[str, Any]]]:
        """(weight files, identity configs) of the motion adapter; a weights file's config is the one read from
        its state dict (given by the loader, or read here)."""
        if self.adapter.is_dir():
            return list(require_component(self.adapter).files), config_files(self.adapter, ("",))
        return [self.adapter], [file_config if file_config is not None else _adapter_file_config(self.adapter)]

    def identity(self, adapter_file_config: dict[str, Any] | None = None) -> str:
        """The model's fingerprint from the full content of every weight file and config."""
        sd_files, sd_configs = self.sd15_parts()
        ad_files, ad_configs = self.adapter_parts(adapter_file_config)
        return fingerprint(IDENTITY_KIND, sd_files + ad_files, sd_configs + ad_configs)


def _sd15_path(spec: str, paths: dict[str, Any]) -> tuple[Path | None, str]:
    """(local path or None for the Hub cache, description) of the SD1.5 weights to use."""
    explicit = paths.get("sd15") or os.environ.get(ENV_SD15)
    if spec != DEFAULT_SPEC:
        path = Path(spec).expanduser()
        if not path.exists() and "/" not in spec and os.sep not in spec and not path.suffix:
            raise UsageError(f"unknown model {spec!r}: use {DEFAULT_SPEC}, tiny, sd15-random, an SD1.5 diffusers "
                             "folder or a single-file .safetensors")
        return path, spec
    if explicit:
        return Path(str(explicit)).expanduser(), str(explicit)
    return None, f"hub:{SD15_REPO}"


def resolve_weights(spec: str, paths: dict[str, Any]) -> Weights:
    """The weights `spec` (not a random spec) means; ModelMissingError / UsageError with a one-line hint."""
    sd_path, sd_source = _sd15_path(str(spec), paths)
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
    elif sd_path.is_file():
        if config_dir is None:
            snap = catalog.hub_snapshot(SD15_REPO)
            config_dir = snap if snap is not None and is_sd15_folder(snap) else None
    else:
        raise ModelMissingError(f"SD1.5 weights not found at {sd_path}: {SD15_GET}")
    given = paths.get("motion_adapter") or os.environ.get(ENV_MOTION_ADAPTER)
    if given:
        adapter, adapter_source = Path(str(given)).expanduser(), str(given)
        if not adapter.exists():
            raise ModelMissingError(f"motion adapter not found at {adapter}: {ADAPTER_GET}")
    else:
        snap = catalog.hub_snapshot(ADAPTER_REPO)
        if snap is None or not (snap / "config.json").is_file():
            raise ModelMissingError(f"AnimateDiff v3 motion adapter not found: {ADAPTER_GET}")
        adapter, adapter_source = snap, f"hub:{ADAPTER_REPO}"
    return Weights(sd_path, sd_source, config_dir, adapter, adapter_source)


_ADAPTER_CONFIGS: dict[str, dict[str, Any]] = {}  # file sha256 -> config read from an adapter weights file


def _adapter_file_config(path: Path) -> dict[str, Any]:
    """The MotionAdapter config load_models reads from an adapter weights file (cached by content)."""
    from stages.models.formats import adapter_config_from_state_dict, convert_original_motion_module, read_state_dict

    sha = file_sha256(path)
    if sha not in _ADAPTER_CONFIGS:
        sd = read_state_dict(path)
        if any(".temporal_transformer." in k for k in sd):
            sd = convert_original_motion_module(sd)
        _ADAPTER_CONFIGS[sha] = adapter_config_from_state_dict(sd)
    return _ADAPTER_CONFIGS[sha]


def model_identity(spec: str, seed: int | None = None, **paths: Any) -> str:
    """The fingerprint `load_models(spec, seed=seed, **paths)` gives its Models, found without building the
    model. Raises ModelMissingError / UsageError as load_models does when the weights are not there."""
    spec = str(spec)
    if spec in RANDOM_SPECS:
        return random_fingerprint(spec, TINY_SEED if seed is None else int(seed), tuple(RANDOM_SPECS[spec]))
    return resolve_weights(spec, paths).identity()
