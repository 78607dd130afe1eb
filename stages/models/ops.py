"""The loaded components (`Models`) and the few calls the stages make on them: text encoding, VAE encode /
decode and one UNet noise prediction; plus the --device / --dtype choices."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from stages.common.errors import InputError, UsageError


@dataclass
class Models:
    """Frozen components in eval mode plus what identifies them."""

    unet: Any  # diffusers UNetMotionModel
    vae: Any  # diffusers AutoencoderKL (float32; on a GPU kept in host memory between its calls)
    text_encoder: Any  # transformers CLIPTextModel (float32; likewise)
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


def host_device(device: torch.device) -> torch.device:
    """Where the VAE and text encoder wait between their calls: host memory when the models run on a GPU (the
    UNet passes then have their 0.77 GiB), else the device itself."""
    return torch.device("cpu") if device.type == "cuda" else device


@contextlib.contextmanager
def on_device(models: Models, module: Any) -> Iterator[Any]:
    """`module` (the VAE or the text encoder) on the models' device for the block, back where it was after."""
    home = next(module.parameters()).device
    if home == models.device:
        yield module
        return
    module.to(models.device)
    try:
        yield module
    finally:
        module.to(home)


def _autocast(models: Models) -> torch.autocast:
    enabled = models.dtype != torch.float32
    return torch.autocast(device_type=models.device.type, dtype=models.dtype, enabled=enabled)


@torch.no_grad()
def encode_text(models: Models, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden states (N, 77, D) float32 for prompts padded (with EOS) / truncated to 77 tokens."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = models.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids.to(models.device)
    with on_device(models, models.text_encoder) as text:
        return text(ids).last_hidden_state.float()


@torch.no_grad()
def vae_encode(models: Models, frames: np.ndarray, seed: int = 42, chunk: int = 4) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) -> posterior SAMPLE (F, 4, H/8, W/8) x 0.18215, float32 (ALGORITHM.md §1.3).

    Moments are computed in chunks of frames, each chunk copied to the device and converted on its own (the
    device holds one chunk of pixels, whatever the clip's length); the noise is drawn once for all frames
    from a generator seeded with `seed` on the model device, as a one-batch encode would.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 8 or frames.shape[2] % 8:
        raise InputError(f"frame size {frames.shape[1]}x{frames.shape[2]} must be a multiple of 8")
    parts = []
    with on_device(models, models.vae) as vae:
        for i in range(0, len(frames), chunk):
            x = torch.from_numpy(frames[i:i + chunk]).to(models.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            parts.append(vae.encode(x).latent_dist.parameters)
    moments = torch.cat(parts)
    gen = torch.Generator(device=models.device).manual_seed(seed)
    latents = DiagonalGaussianDistribution(moments).sample(generator=gen)
    return (latents * models.vae.config.scaling_factor).float()


@torch.no_grad()
def vae_decode(models: Models, latents: torch.Tensor) -> np.ndarray:
    """Latents (F, 4, h, w) -> uint8 frames (F, 8h, 8w, 3), decoded one frame at a time, rounded."""
    out = []
    with on_device(models, models.vae) as vae:
        for z in latents:
            z = z[None].to(models.device, torch.float32) / vae.config.scaling_factor
            img = vae.decode(z).sample
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


def unet_eps(models: Models, z: torch.Tensor, t: int, emb: torch.Tensor,
             residuals: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Noise prediction (B, F, 4, h, w) float32 for latents (B, F, 4, h, w) at timestep t.

    emb: (B*F, 77, D), batch-major and frame-minor (row b*F + f conditions frame f of clip b). Runs under
    autocast in models.dtype when that is not float32; gradients flow when the caller enables them.
    residuals: ControlNet (down, mid) residuals in the same row order, added to the UNet's features
    (vd edit --first-frame).
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
        extra = {} if residuals is None else {"down_block_additional_residuals": tuple(residuals[0]),
                                              "mid_block_additional_residual": residuals[1]}
        out = models.unet(sample, timestep, encoder_hidden_states=emb.to(models.device), **extra).sample
    return out.float().permute(0, 2, 1, 3, 4)
