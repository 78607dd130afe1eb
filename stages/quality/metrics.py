"""Small pure metric functions used by `vd eval` (see docs/commands/eval.md for the definitions).

Conventions: frames are (H, W, 3) arrays with values in [0, 255] (uint8 or float); a `region` is a
boolean (H, W) array of the pixels a metric looks at (None = whole frame). Functions that need torch
or a model import it lazily, so the numpy metrics stay light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.errors import InputError
from stages.common.errors import first_line

# ----------------------------------------------------------------------------- PSNR / SSIM


def _as_float(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _check_pair(a: np.ndarray, b: np.ndarray, region: np.ndarray | None) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if region is not None and region.shape != a.shape[:2]:
        raise ValueError(f"region shape {region.shape} does not match frame {a.shape[:2]}")


def mse(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean squared error over the pixels (all channels) in `region`; nan when the region is empty."""
    _check_pair(a, b, region)
    sq = (_as_float(a) - _as_float(b)) ** 2
    if sq.ndim == 3:
        sq = sq.mean(axis=-1)
    if region is not None:
        if not region.any():
            return float("nan")
        sq = sq[region.astype(bool)]
    return float(sq.mean())


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None, data_range: float = 255.0) -> float:
    """PSNR in dB = 10 log10(range^2 / MSE) with the MSE over `region` only; inf when identical there."""
    err = mse(a, b, region)
    if math.isnan(err):
        return err
    if err == 0.0:
        return float("inf")
    return float(10.0 * math.log10(data_range**2 / err))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004), Gaussian window sigma 1.5 (11x11), K1 0.01, K2 0.03.

    Computed per channel with reflected borders and averaged over channels -> (H, W) float64.
    """
    import cv2

    _check_pair(a, b, None)
    x, y = _as_float(a), _as_float(b)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    maps = []
    for ch in range(x.shape[-1]):
        xc, yc = x[..., ch], y[..., ch]

        def blur(img: np.ndarray) -> np.ndarray:  # 11-tap Gaussian, mirror border 'dcba|abcd'
            return cv2.GaussianBlur(img, (11, 11), sigma, borderType=cv2.BORDER_REFLECT)

        mx, my = blur(xc), blur(yc)
        vx = blur(xc * xc) - mx * mx
        vy = blur(yc * yc) - my * my
        cxy = blur(xc * yc) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return np.mean(maps, axis=0)


def region_mean(values: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean of a per-pixel map over `region` (nan when the region is empty)."""
    if region is None:
        return float(np.mean(values))
    region = region.astype(bool)
    return float(values[region].mean()) if region.any() else float("nan")


def ssim(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None, data_range: float = 255.0) -> float:
    """Mean of the SSIM map over `region` (the map itself is computed on the whole frames)."""
    _check_pair(a, b, region)
    return region_mean(ssim_map(a, b, data_range), region)


# ----------------------------------------------------------------------------- optical flow + warping

FARNEBACK = {"pyr_scale": 0.5, "levels": 4, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2}


def _gray(frame: np.ndarray) -> np.ndarray:
    import cv2

    img = np.clip(_as_float(frame), 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img


def farneback_flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Dense flow (H, W, 2) as (dx, dy) such that prev(p) ~ nxt(p + flow(p)) (OpenCV Farneback)."""
    import cv2

    flow = cv2.calcOpticalFlowFarneback(_gray(prev), _gray(nxt), None, FARNEBACK["pyr_scale"],
                                        FARNEBACK["levels"], FARNEBACK["winsize"], FARNEBACK["iterations"],
                                        FARNEBACK["poly_n"], FARNEBACK["poly_sigma"], 0)
    return flow.astype(np.float32)


def warp_back(img: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample `img` at p + flow(p) (bilinear). Returns (warped float32, inside: sample point in frame)."""
    import cv2

    h, w = flow.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mx, my = xx + flow[..., 0], yy + flow[..., 1]
    warped = cv2.remap(np.asarray(img, dtype=np.float32), mx, my, interpolation=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return warped, inside


def consistent_flow(fwd: np.ndarray, bwd: np.ndarray, alpha: float = 0.01, beta: float = 0.5) -> np.ndarray:
    """Forward-backward check: True where |fwd + bwd(p + fwd)|^2 <= alpha (|fwd|^2 + |bwd(p+fwd)|^2) + beta."""
    bwd_at, inside = warp_back(bwd, fwd)
    gap = np.sum((fwd + bwd_at) ** 2, axis=-1)
    bound = alpha * (np.sum(fwd**2, axis=-1) + np.sum(bwd_at**2, axis=-1)) + beta
    return (gap <= bound) & inside


def warp_error(frame: np.ndarray, next_frame: np.ndarray, fwd: np.ndarray, bwd: np.ndarray | None = None,
               region: np.ndarray | None = None) -> float:
    """Mean squared difference (values scaled to [0, 1]) between `frame` and `next_frame` warped back
    with the flow `fwd` (frame -> next), over in-frame pixels of `region` that pass the occlusion check
    (when `bwd`, the next -> frame flow, is given). nan when no pixel is left."""
    warped, valid = warp_back(next_frame, fwd)
    if bwd is not None:
        valid &= consistent_flow(fwd, bwd)
    if region is not None:
        valid &= region.astype(bool)
    if not valid.any():
        return float("nan")
    diff = (_as_float(frame) - warped) / 255.0
    sq = np.sum(diff**2, axis=-1) / diff.shape[-1] if diff.ndim == 3 else diff**2
    return float(sq[valid].mean())


# ----------------------------------------------------------------------------- smoothness proxy


def smoothness_proxy(frames: np.ndarray) -> np.ndarray:
    """Per interior frame f: 1 - mean |x_f - (x_{f-1} + x_{f+1}) / 2| / 255 (1 = perfectly smooth).

    This is VBench's motion-smoothness formula with its learned frame interpolator replaced by a plain
    average of the neighbours, i.e. half the mean absolute second temporal difference. Shape (F-2,).
    """
    x = _as_float(frames)
    if x.shape[0] < 3:
        return np.zeros((0,), dtype=np.float64)
    mid = np.abs(x[1:-1] - 0.5 * (x[:-2] + x[2:]))
    return 1.0 - mid.reshape(mid.shape[0], -1).mean(axis=1) / 255.0


# ----------------------------------------------------------------------------- LPIPS

# Input normalisation of LPIPS (Zhang et al. 2018) applied to images in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Feature taps: index (in torchvision's `features`) of the ReLU after which a feature is taken.
LPIPS_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
LPIPS_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


@dataclass
class LpipsNet:
    """A pretrained LPIPS: torchvision backbone `features` + one non-negative 1x1 weight per tap."""

    kind: str
    features: Any  # torch.nn.Sequential
    lin: list[Any]  # torch tensors (C,)
    source: str = ""
    device: Any = field(default="cpu")


def _lin_weight(state: dict[str, Any], k: int) -> Any | None:
    for key in (f"lin{k}.model.1.weight", f"lin{k}.weight", f"lins.{k}.model.1.weight"):
        if key in state:
            return state[key].reshape(-1).float()
    return None


def lpips_from_state_dict(state: dict[str, Any], source: str = "") -> LpipsNet:
    """Build LPIPS from one merged state dict: torchvision `features.N.*` keys + `linK.model.1.weight`."""
    import torchvision

    state = {k.removeprefix("net.").removeprefix("module."): v for k, v in state.items()}
    first = state.get("features.0.weight")
    if first is None:
        raise InputError(f"LPIPS weights {source}: no backbone (torchvision `features.0.weight` key) found")
    kind = "alex" if tuple(first.shape[-2:]) == (11, 11) else "vgg"
    features = (torchvision.models.alexnet(weights=None) if kind == "alex"
                else torchvision.models.vgg16(weights=None)).features
    last = LPIPS_TAPS[kind][-1]
    features = features[: last + 1]
    backbone = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    try:
        features.load_state_dict(backbone, strict=True)
    except RuntimeError as exc:
        raise InputError(f"LPIPS weights {source}: backbone does not match torchvision {kind}: "
                         f"{first_line(exc)}") from None
    lin = []
    for k, ch in enumerate(LPIPS_CHANNELS[kind]):
        w = _lin_weight(state, k)
        if w is None or w.numel() != ch:
            raise InputError(f"LPIPS weights {source}: linear layer lin{k} ({ch} channels) missing "
                             f"for the {kind} backbone")
        lin.append(w)
    features.eval().requires_grad_(False)
    return LpipsNet(kind=kind, features=features, lin=lin, source=source)


def lpips_maps(net: LpipsNet, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LPIPS between frame stacks (N, H, W, 3) in [0, 255].

    Returns (values (N,): the standard LPIPS, per-layer spatial means summed; maps (N, H, W): per-layer
    maps bilinearly upsampled to the frame size and summed, for region averages).
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(net.device)
    net.features.to(dev)
    shift = torch.tensor(LPIPS_SHIFT, device=dev).view(1, 3, 1, 1)
    scale = torch.tensor(LPIPS_SCALE, device=dev).view(1, 3, 1, 1)
    taps = set(LPIPS_TAPS[net.kind])

    def feats(x: np.ndarray) -> list[Any]:
        t = torch.as_tensor(np.asarray(x, dtype=np.float32), device=dev).permute(0, 3, 1, 2)
        h = (t / 127.5 - 1.0 - shift) / scale
        out = []
        for i, layer in enumerate(net.features):
            h = layer(h)
            if i in taps:
                out.append(h / (torch.sqrt(torch.sum(h * h, dim=1, keepdim=True)) + 1e-10))
        return out

    values, maps = [], []
    with torch.no_grad():
        for i in range(a.shape[0]):
            fa, fb = feats(a[i : i + 1]), feats(b[i : i + 1])
            total, full = 0.0, torch.zeros(a.shape[1:3], device=dev)
            for k, (xa, xb) in enumerate(zip(fa, fb)):
                layer_map = torch.einsum("bchw,c->bhw", (xa - xb) ** 2, net.lin[k].to(dev))
                total += float(layer_map.mean())
                full += F.interpolate(layer_map[:, None], size=a.shape[1:3], mode="bilinear",
                                      align_corners=False)[0, 0]
            values.append(total)
            maps.append(full.cpu().numpy())
    return np.asarray(values, dtype=np.float64), np.stack(maps).astype(np.float64)


def load_state_files(path: Path) -> dict[str, Any]:
    """Merge the tensors of a .safetensors/.pth/.pt file, or of every such file in a folder.

    .pth/.pt files are read with torch.load(weights_only=True): no code runs from the file.
    """
    from stages.io.weights import read_state_dict

    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
    if not files:
        raise InputError(f"{path}: no .safetensors/.pth/.pt weight files found")
    merged: dict[str, Any] = {}
    for f in files:
        data = read_state_dict(f)
        merged.update({k: v for k, v in data.items() if hasattr(v, "shape")})
    return merged


# ----------------------------------------------------------------------------- CLIP / PickScore


def clip_similarity(model: Any, processor: Any, frames: np.ndarray, text: str, device: Any = "cpu",
                    batch: int = 8) -> tuple[np.ndarray, float]:
    """Cosine similarity between each frame's and the text's CLIP embeddings -> ((N,), exp(logit_scale))."""
    import torch
    from PIL import Image

    model.to(device)
    sims = []
    with torch.no_grad():
        for start in range(0, frames.shape[0], batch):
            images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames[start : start + batch]]
            inputs = processor(text=[text], images=images, return_tensors="pt", padding=True, truncation=True)
            inputs = {k: v.to(device) for k, v in inputs.items() if hasattr(v, "to")}
            out = model(**inputs)
            img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
            txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
            sims.append((img @ txt.T)[:, 0].float().cpu().numpy())
        scale = float(model.logit_scale.exp().item())
    return np.concatenate(sims).astype(np.float64), scale


def clip_score(cosine: np.ndarray) -> np.ndarray:
    """CLIP score = 100 * max(cos, 0) per frame (the torchmetrics / CLIPScore-without-2.5 convention)."""
    return 100.0 * np.maximum(np.asarray(cosine, dtype=np.float64), 0.0)


def pick_score(cosine: np.ndarray, scale: float) -> np.ndarray:
    """PickScore = scale * cos, with `scale` = exp(logit_scale) of the PickScore model (about 100)."""
    return scale * np.asarray(cosine, dtype=np.float64)


def interpolation_smoothness(frames: np.ndarray, interpolate: Any) -> float:
    """VBench-style motion smoothness: keep the even frames, predict each odd frame between two even
    ones with `interpolate(a, b) -> uint8 frame`, score = (255 - mean |pred - real odd frame|) / 255."""
    frames = np.asarray(frames)
    even, odd = frames[0::2], frames[1::2]
    diffs = [np.abs(_as_float(odd[i]) - _as_float(interpolate(even[i], even[i + 1]))).mean()
             for i in range(min(len(even) - 1, len(odd)))]
    if not diffs:
        return float("nan")
    return float((255.0 - np.mean(diffs)) / 255.0)
