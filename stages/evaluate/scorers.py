"""The optional model-based metrics of `vd eval` (LPIPS, CLIP score, PickScore, VBench smoothness).

Each is loaded once, from weights named by a flag, a VD_* variable or `vd models --get`; when none are
present locally the metric is reported as unavailable (with how to enable it), never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.errors import InputError, first_line
from stages.evaluate.config import EvalConfig, unavailable
from stages.quality import metrics as M

HOW = {
    "lpips": "pass --lpips PATH or set VD_LPIPS=PATH: one .safetensors/.pth holding torchvision AlexNet or "
             "VGG16 `features.*` plus LPIPS `lin0..lin4` weights, or a folder with both files "
             "(e.g. alexnet-owt-7be5be79.pth + the lpips project's weights/v0.1/alex.pth), "
             "or run `vd models --get lpips`",
    "clip": "pass --clip DIR or set VD_CLIP=DIR: a local Hugging Face CLIP folder "
            "(e.g. a copy of openai/clip-vit-large-patch14 with its processor files), "
            "or run `vd models --get clip`",
    "pickscore": "pass --pickscore DIR or set VD_PICKSCORE=DIR: a local copy of yuvalkirstain/PickScore_v1; "
                 "if it lacks processor files set VD_PICKSCORE_PROCESSOR to a copy of "
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K; or run `vd models --get pickscore`",
    "vbench": "install the vbench package and put VBench's AMT-S checkpoint at ~/.cache/vbench/amt_model/amt-S.pth "
              "or pass --amt PATH / set VD_AMT=PATH",
}


class Scorers:
    """Optional model-based metrics, loaded once (and shared between workspaces in `compare`)."""

    def __init__(self, config: EvalConfig):
        self.paths = {
            "lpips": _configured(config.lpips, "VD_LPIPS", "--lpips") or _downloaded("lpips"),
            "clip": _configured(config.clip, "VD_CLIP", "--clip") or _downloaded("clip"),
            "pickscore": _configured(config.pickscore, "VD_PICKSCORE", "--pickscore") or _downloaded("pickscore"),
            "vbench": _configured(config.amt, "VD_AMT", "--amt") or _default_amt(),
        }
        self.device_name = config.device
        self._cache: dict[str, Any] = {}

    def describe(self) -> dict[str, str | None]:
        """Weight paths in use (stored in the eval settings)."""
        return {k: (str(v) if v else None) for k, v in self.paths.items()}

    @property
    def device(self) -> str:
        if self.device_name != "auto":
            return self.device_name
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def get(self, name: str) -> Any:
        """The loaded scorer for `name`, or an `unavailable(...)` dict."""
        if name not in self._cache:
            self._cache[name] = self._load(name)
        return self._cache[name]

    def _load(self, name: str) -> Any:
        path = self.paths[name]
        if name == "vbench":
            return _load_amt(path, self.device)
        if path is None:
            return unavailable(f"{name} weights not configured", HOW[name])
        if name == "lpips":
            net = M.lpips_from_state_dict(M.load_state_files(path), str(path))
            net.device = self.device
            return net
        processor = None
        if name == "pickscore":  # PickScore_v1 ships without processor files; they may live elsewhere
            processor = (_configured(None, "VD_PICKSCORE_PROCESSOR", "VD_PICKSCORE_PROCESSOR")
                         or _downloaded("pickscore-processor"))
        return _load_clip(path, processor or path, name)


def _configured(value: str | None, env: str, flag: str) -> Path | None:
    raw = value or os.environ.get(env) or None
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.exists():
        raise InputError(f"{flag} {raw}: no such file or folder")
    return path


def _downloaded(name: str) -> Path | None:
    """Weights `vd models --get NAME` put into the standard caches (used when nothing is configured)."""
    from stages.models.catalog import locate

    try:
        return locate(name)
    except ImportError:  # huggingface_hub missing: nothing can have been downloaded
        return None


def _default_amt() -> Path | None:
    path = Path.home() / ".cache" / "vbench" / "amt_model" / "amt-S.pth"
    return path if path.is_file() else None


def _load_clip(path: Path, processor_path: Path, name: str) -> Any:
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
    except Exception as exc:
        raise InputError(f"--{name} {path} is not a loadable local CLIP model folder: {first_line(exc)}") from None
    try:
        processor = CLIPProcessor.from_pretrained(str(processor_path), local_files_only=True)
    except Exception as exc:
        hint = " (set VD_PICKSCORE_PROCESSOR to a folder with the CLIP-ViT-H-14 processor files)" \
            if name == "pickscore" else ""
        raise InputError(f"no usable CLIP processor in {processor_path}{hint}: {first_line(exc)}") from None
    return model, processor


def _load_amt(path: Path | None, device: str) -> Any:
    """VBench's AMT-S interpolator as a function (a, b) -> middle frame, or unavailable."""
    try:
        import vbench  # noqa: F401
        from omegaconf import OmegaConf
        from vbench.third_party.amt.utils.build_utils import build_from_cfg
    except ImportError:
        return unavailable("the vbench package is not installed", HOW["vbench"])
    if path is None:
        return unavailable("VBench AMT-S weights not found", HOW["vbench"])
    import torch
    import torch.nn.functional as F

    cfg = Path(vbench.__file__).parent / "third_party" / "amt" / "cfgs" / "AMT-S.yaml"
    try:
        net = build_from_cfg(OmegaConf.load(str(cfg)).network)
        net.load_state_dict(M.load_state_files(path))
    except Exception as exc:
        return unavailable(f"cannot load AMT-S from {path}: {first_line(exc)}", HOW["vbench"])
    net = net.to(device).eval()
    embt = torch.full((1, 1, 1, 1), 0.5, device=device)

    def interpolate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        h, w = a.shape[:2]
        pad = (0, (-w) % 16, 0, (-h) % 16)

        def prep(x: np.ndarray) -> Any:
            t = torch.as_tensor(x, dtype=torch.float32, device=device).permute(2, 0, 1)[None] / 255.0
            return F.pad(t, pad, mode="replicate")

        with torch.no_grad():
            mid = net(prep(a), prep(b), embt, scale_factor=1.0, eval=True)["imgt_pred"][0, :, :h, :w]
        return (mid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()

    return interpolate
