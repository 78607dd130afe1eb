"""SAM2 video tracking from points/boxes on one frame, propagated forward and backward.

Checkpoints are the official sam2.1_hiera_{tiny,small,base_plus,large}.pt files, found in
$VD_SAM2_DIR, the Hugging Face cache (facebook/sam2.1-hiera-*), or ~/.cache/vd/sam2. Frames are fed
from memory (no JPEG folder). On CPU the run is float32 throughout, including the mask memory that
SAM2 would otherwise store in bfloat16; on CUDA it runs under bf16 autocast like SAM2's own demo.

This module imports torch/sam2 lazily so `SAM2_CHECKPOINTS` and `find_sam2_checkpoint` stay cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from stages.common.cache import vd_cache
from stages.common.errors import InputError, ModelMissingError, UsageError, first_line
from stages.models import catalog
from stages.models.catalog import ENV_SAM2_DIR, SAM2_CHECKPOINTS

ALIASES = {"t": "tiny", "s": "small", "base": "base_plus", "base-plus": "base_plus", "b+": "base_plus",
           "l": "large"}
AUTO_ORDER = ("large", "base_plus", "small", "tiny")
RANDOM = "random"  # untrained tiny model at 256 px: for tests and plumbing only


def canonical_name(name: str) -> str:
    """'base' -> 'base_plus' etc.; other strings (paths, 'auto', 'random') unchanged."""
    low = name.lower()
    if low in SAM2_CHECKPOINTS or low in ("auto", RANDOM):
        return low
    return ALIASES.get(low, name)


def sam2_dirs() -> list[Path]:
    """Folders searched for checkpoint files, besides the Hugging Face cache."""
    dirs = [Path(os.environ[ENV_SAM2_DIR]).expanduser()] if os.environ.get(ENV_SAM2_DIR) else []
    return [*dirs, vd_cache("sam2")]


def find_sam2_checkpoint(name: str) -> Path | None:
    """Local path of checkpoint `name` (tiny|small|base_plus|large|auto or a file path), or None."""
    name = canonical_name(name)
    if name == "auto":
        for candidate in AUTO_ORDER:
            found = find_sam2_checkpoint(candidate)
            if found is not None:
                return found
        return None
    if name not in SAM2_CHECKPOINTS:
        path = Path(name).expanduser()
        return path if path.is_file() else None
    ckpt = SAM2_CHECKPOINTS[name]
    for folder in sam2_dirs():
        if (folder / ckpt.filename).is_file():
            return folder / ckpt.filename
    return catalog.hub_file(ckpt.hub_id, ckpt.filename)


def how_to_get(name: str = "large") -> str:
    """One line telling the user how to obtain checkpoint `name`."""
    ckpt = SAM2_CHECKPOINTS[canonical_name(name) if canonical_name(name) in SAM2_CHECKPOINTS else "large"]
    return (f"download {ckpt.url} ({ckpt.size_mb} MB) into {sam2_dirs()[-1]} or $VD_SAM2_DIR, "
            f"or run `huggingface-cli download {ckpt.hub_id} {ckpt.filename}`")


def resolve_checkpoint(name: str) -> Path | None:
    """The checkpoint to use for --sam2 `name`; None means random weights (name 'random').

    Raises ModelMissingError (exit 4) naming how to get the weights when none is found.
    """
    canon = canonical_name(name)
    if canon == RANDOM:
        return None
    found = find_sam2_checkpoint(canon)
    if found is not None:
        return found
    if canon not in SAM2_CHECKPOINTS and canon != "auto":
        if any(sep in name for sep in "/\\") or name.endswith(".pt"):
            raise InputError(f"SAM2 checkpoint {name} not found")
        raise UsageError(f"--sam2 {name!r}: use tiny, small, base_plus, large, auto or a .pt path")
    wanted = "large" if canon == "auto" else canon
    raise ModelMissingError(f"SAM2 weights ({SAM2_CHECKPOINTS[wanted].filename}) not found; "
                            f"{how_to_get(wanted)}; or give masks with --mask-dir/--mask-video, or --box-only")


# ----------------------------------------------------------------------------------- model
def _config_for_state(state: dict[str, Any], path: Path) -> str:
    """Pick the sam2 config that matches a checkpoint's tensors (hiera size and 2.0 vs 2.1)."""
    for ckpt in SAM2_CHECKPOINTS.values():
        if path.name == ckpt.filename:
            return ckpt.config
    key = "image_encoder.trunk.patch_embed.proj.weight"
    if key not in state:
        raise InputError(f"{path} is not a SAM2 checkpoint (no Hiera image encoder)")
    blocks = {k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")}
    by_shape = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}
    short = by_shape.get((int(state[key].shape[0]), len(blocks)))
    if short is None:
        raise InputError(f"{path}: unknown SAM2 variant (embed {state[key].shape[0]}, {len(blocks)} blocks)")
    if "no_obj_embed_spatial" in state:
        return f"configs/sam2.1/sam2.1_hiera_{short}.yaml"
    return f"configs/sam2/sam2_hiera_{short}.yaml"


def pick_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked but no CUDA device is available")
    return device


def load_predictor(checkpoint: Path | None, device: str = "auto", seed: int = 0) -> Any:
    """Build the SAM2 video predictor from `checkpoint`, or a small random one when it is None."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    device = pick_device(device)
    overrides: list[str] = []
    state = None
    if checkpoint is None:
        config = SAM2_CHECKPOINTS["tiny"].config
        overrides = ["++model.image_size=256",
                     "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
                     "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]"]
    else:
        try:
            loaded = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        except Exception:  # torch's own text is a bare KeyError or advice to drop weights_only: neither helps
            raise InputError(f"{checkpoint} is not a loadable SAM2 checkpoint (not a PyTorch checkpoint file, "
                             f"or one that needs code execution to load)") from None
        state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise InputError(f"{checkpoint} is not a SAM2 checkpoint (no state dict)")
        config = _config_for_state(state, Path(checkpoint))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2_video_predictor(config, None, device="cpu", hydra_overrides_extra=overrides)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InputError(f"{checkpoint} does not match SAM2 config {config} ({first_line(exc)})") from None
    if importlib.util.find_spec("sam2._C") is None:
        model.fill_hole_area = 0  # the hole filling needs sam2's optional CUDA extension
    if device == "cpu":
        model.__class__ = _float32_memory_class(type(model))
    return model.to(device).eval()


_F32_CLASSES: dict[type, type] = {}


def _float32_memory_class(base: type) -> type:
    """A subclass of the predictor that keeps the mask memory in float32.

    SAM2 casts every memory feature to bfloat16 before storing it; without autocast (CPU) that
    rounding degrades tracking, most visibly in reverse propagation. The subclass remembers the
    float32 features from the memory encoder and stores those instead.
    """
    if base in _F32_CLASSES:
        return _F32_CLASSES[base]

    class Float32Memory(base):  # type: ignore[misc, valid-type]
        _vd_memory = None

        def _encode_new_memory(self, *args: Any, **kwargs: Any) -> Any:
            features, pos = super()._encode_new_memory(*args, **kwargs)
            self._vd_memory = features
            return features, pos

        def _run_single_frame_inference(self, *args: Any, **kwargs: Any) -> Any:
            self._vd_memory = None
            out, masks = super()._run_single_frame_inference(*args, **kwargs)
            if self._vd_memory is not None and out.get("maskmem_features") is not None:
                out["maskmem_features"] = self._vd_memory.to(out["maskmem_features"].device)
            self._vd_memory = None
            return out, masks

        def _run_memory_encoder(self, *args: Any, **kwargs: Any) -> Any:
            self._vd_memory = None
            features, pos = super()._run_memory_encoder(*args, **kwargs)
            if self._vd_memory is not None:
                features = self._vd_memory.to(features.device)
            self._vd_memory = None
            return features, pos

    Float32Memory.__name__ = f"Float32Memory{base.__name__}"
    _F32_CLASSES[base] = Float32Memory
    return Float32Memory


# ----------------------------------------------------------------------------------- tracking
def _frames_tensor(frames: np.ndarray, image_size: int) -> Any:
    """uint8 (F, H, W, 3) -> normalised float (F, 3, S, S) as SAM2's loaders produce."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


@contextlib.contextmanager
def _in_memory_video(frames: np.ndarray, device: str) -> Iterator[None]:
    """Make SAM2's init_state read `frames` instead of a JPEG folder, and silence its tqdm bars."""
    import sam2.sam2_video_predictor as svp
    from unittest import mock

    height, width = frames.shape[1:3]

    def load_frames(video_path: Any, image_size: int, offload_video_to_cpu: bool, **_: Any) -> Any:
        images = _frames_tensor(frames, image_size)
        return (images if offload_video_to_cpu else images.to(device)), height, width

    def quiet(iterable: Any, *_: Any, **__: Any) -> Any:
        return iterable

    with mock.patch.object(svp, "load_video_frames", load_frames), mock.patch.object(svp, "tqdm", quiet):
        yield


def track(predictor: Any, frames: np.ndarray, points: Sequence[tuple[float, float, int]] = (),
          box: Sequence[float] | None = None, prompt_frame: int = 0, progress: Any = None) -> np.ndarray:
    """Segment one object prompted on `prompt_frame` and propagate it through all frames.

    `points` are (x, y, label) with label 1 = object, 0 = background; `box` is (x0, y0, x1, y1);
    both in pixels of `frames`. Returns uint8 masks (F, H, W) with values 0/1 (logits > 0).
    """
    if not points and box is None:
        raise UsageError("SAM2 needs at least one --point or a --box")
    masks, _ = track_objects(predictor, frames, [(points, box)], prompt_frame, progress)
    return masks[0]


# ----------------------------------------------------------------------------------- several objects
def resolve_overlaps(logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Give each pixel to at most one object: the one with the highest SAM2 logit, if that logit is > 0.

    `logits` (N, H, W) (numpy or torch). Returns (owner, pairs): owner uint8 (H, W) holding 0 for no
    object and k + 1 for object k; pairs int64 (N, N), upper triangle: pixels where objects i < j both had
    a positive logit before the resolution. Ties go to the earlier object.
    """
    import torch

    scores = torch.as_tensor(logits).float()
    positive = scores > 0
    best = scores.argmax(dim=0)
    owner = torch.where(positive.any(dim=0), best + 1, torch.zeros_like(best))
    count = scores.shape[0]
    pairs = np.zeros((count, count), np.int64)
    flat = positive.reshape(count, -1).float()
    if count > 1:
        both = (flat @ flat.T).round().long().cpu().numpy()
        pairs = np.triu(both, k=1).astype(np.int64)
    return owner.to(torch.uint8).cpu().numpy(), pairs


def track_objects(predictor: Any, frames: np.ndarray,
                  prompts: Sequence[tuple[Sequence[tuple[float, float, int]], Sequence[float] | None]],
                  prompt_frame: int = 0, progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Track several objects, prompted on `prompt_frame`, in ONE SAM2 propagation (forward, then backward).

    `prompts[k]` = (points, box) of object k, as in `track` (pixels of `frames`). Overlaps are resolved
    per pixel by the highest logit (`resolve_overlaps`). Returns (masks, pairs): masks uint8 (N, F, H, W)
    0/1, disjoint across objects; pairs int64 (N, N): overlapping pixels of objects i < j summed over all
    frames, before the resolution.
    """
    import torch

    count = len(frames)
    if not prompts:
        raise UsageError("SAM2 needs at least one object")
    for points, box in prompts:
        if not points and box is None:
            raise UsageError("SAM2 needs at least one --point or a --box for every object")
    if not 0 <= prompt_frame < count:
        raise UsageError(f"--prompt-frame {prompt_frame} is outside the {count} frames")
    device = str(predictor.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else contextlib.nullcontext())
    number = len(prompts)
    masks = np.zeros((number, *frames.shape[:3]), np.uint8)
    pairs = np.zeros((number, number), np.int64)
    seen: set[int] = set()
    total = count + (1 if prompt_frame > 0 else 0)
    task = progress.task("SAM2 tracking", total) if progress is not None else contextlib.nullcontext()
    with _in_memory_video(frames, device), torch.inference_mode(), autocast, task as advance:
        state = predictor.init_state(video_path="<memory>", offload_video_to_cpu=device == "cpu")
        for k, (points, box) in enumerate(prompts):
            kwargs: dict[str, Any] = {}
            if points:
                kwargs["points"] = np.array([[p[0], p[1]] for p in points], np.float32)
                kwargs["labels"] = np.array([int(p[2]) for p in points], np.int32)
            if box is not None:
                kwargs["box"] = np.array(box, np.float32)
            predictor.add_new_points_or_box(state, frame_idx=prompt_frame, obj_id=k + 1, **kwargs)
        for reverse in (False, True):
            for index, obj_ids, logits in predictor.propagate_in_video(state, start_frame_idx=prompt_frame,
                                                                       reverse=reverse):
                order = [list(obj_ids).index(k + 1) for k in range(number)]
                owner, counted = resolve_overlaps(logits[order, 0].float())
                for k in range(number):
                    masks[k, index] = owner == k + 1
                if index not in seen:  # the prompt frame comes twice (both directions): count it once
                    pairs += counted
                    seen.add(index)
                if advance:
                    advance()
    return masks, pairs
