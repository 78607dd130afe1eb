"""Where vd's weights live: every Hub repository id and file name, the environment variables that override
them, the vd cache root, and the one Hugging Face cache lookup (`hub_snapshot`).

Import-light on purpose (no torch, diffusers or network): `vd models`, the SAM2 lookup and `vd eval` read it
without loading a model; huggingface_hub is imported only inside the cache lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from stages.common.cache import vd_cache

# ------------------------------------------------------------------------------------- repositories

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ADAPTER_REPO = "guoyww/animatediff-motion-adapter-v1-5-3"
V3_CKPT_URL = "https://huggingface.co/guoyww/animatediff/resolve/main/v3_sd15_mm.ckpt"
CLIP_REPO = "openai/clip-vit-large-patch14"
PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the CLIP-H PickScore was fine-tuned from
SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
SPARSECTRL_REPO = "guoyww/animatediff-sparsectrl-rgb"  # AnimateDiff SparseCtrl RGB (vd edit --first-frame)
DETECTOR_REPO = "IDEA-Research/grounding-dino-tiny"  # zero-shot detector (vd mask --text)
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's merge table, shipped inside open-clip-torch

DEFAULT_SPEC = "sd15-animatediff-v3"
MODEL_SUBFOLDERS = ("unet", "vae", "text_encoder")  # the SD1.5 components vd loads from a diffusers folder
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")

# ------------------------------------------------------------------------------------- environment

ENV_SD15 = "VD_SD15"  # an SD1.5 diffusers folder or single-file .safetensors
ENV_SD15_CONFIG = "VD_SD15_CONFIG"  # configs for a single-file SD1.5 checkpoint
ENV_MOTION_ADAPTER = "VD_MOTION_ADAPTER"  # a MotionAdapter folder or the original v3_sd15_mm.ckpt
ENV_SAM2_DIR = "VD_SAM2_DIR"  # a folder holding sam2.1_hiera_*.pt
ENV_CLIP, ENV_PICKSCORE, ENV_LPIPS = "VD_CLIP", "VD_PICKSCORE", "VD_LPIPS"
ENV_PICKSCORE_PROCESSOR = "VD_PICKSCORE_PROCESSOR"
ENV_SPARSECTRL = "VD_SPARSECTRL"  # a diffusers SparseControlNetModel folder (SparseCtrl RGB)
ENV_DETECTOR = "VD_GROUNDING_DINO"  # a Grounding DINO folder (config, weights, processor files)
ENV_MIRROR = "VD_DOWNLOAD_MIRROR"  # http(s)://host[/prefix]: fetch https://a.b/c from {mirror}/a.b/c instead
HF_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")

SD15_GET = (f"hf download {SD15_REPO} --include 'unet/*' --include 'vae/*' --include 'text_encoder/*' "
            "--include 'tokenizer/*' --exclude '*.bin' --exclude '*fp16*' --exclude '*non_ema*' (about 4.3 GB), "
            f"or set {ENV_SD15} to an SD1.5 diffusers folder or single-file .safetensors")
ADAPTER_GET = (f"hf download {ADAPTER_REPO}, or set {ENV_MOTION_ADAPTER} to a MotionAdapter folder or to "
               f"v3_sd15_mm.ckpt ({V3_CKPT_URL})")
SPARSECTRL_GET = (f"hf download {SPARSECTRL_REPO} config.json diffusion_pytorch_model.safetensors (about 2 GB), "
                  f"or set {ENV_SPARSECTRL} to a SparseControlNetModel folder")


@dataclass(frozen=True)
class Sam2Checkpoint:
    """One official SAM2.1 checkpoint: file name, Hub repo, direct URL and sam2 config name."""

    name: str
    filename: str
    hub_id: str
    url: str
    config: str
    size_mb: int


SAM2_CHECKPOINTS: dict[str, Sam2Checkpoint] = {
    name: Sam2Checkpoint(name, f"sam2.1_hiera_{name}.pt", f"facebook/sam2.1-hiera-{name.replace('_', '-')}",
                         f"{SAM2_URL}sam2.1_hiera_{name}.pt", f"configs/sam2.1/sam2.1_hiera_{short}.yaml", size)
    for name, short, size in (("tiny", "t", 156), ("small", "s", 184), ("base_plus", "b+", 324),
                              ("large", "l", 898))
}

# ------------------------------------------------------------------------------------- `vd models --get`


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repo; `alternatives` are tried in order when `filename` is not in the repo."""

    repo_id: str
    filename: str
    size_mb: float = 0.0  # approximate, for the plan and the docs only (never a check)
    alternatives: tuple[str, ...] = ()
    optional: bool = False  # absent from the repo -> skipped, not an error

    @property
    def label(self) -> str:
        return f"{self.repo_id}/{self.filename}"


@dataclass(frozen=True)
class UrlFile:
    """One file from an official URL, stored as <vd cache>/<folder>/<filename>."""

    url: str
    folder: str
    filename: str
    sha256: str | None = None  # the published digest, or the published prefix of it (torchvision's names)
    size_mb: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.folder}/{self.filename}"


File = HubFile | UrlFile

_TOKENIZER = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
_PROCESSOR = ("preprocessor_config.json", "tokenizer_config.json", "vocab.json", "merges.txt")
_OPTIONAL_PROCESSOR = ("tokenizer.json", "special_tokens_map.json")


def _processor(repo: str) -> tuple[HubFile, ...]:
    sizes = {"vocab.json": 1.0, "merges.txt": 0.5, "tokenizer.json": 2.0}
    return (*(HubFile(repo, name, sizes.get(name, 0)) for name in _PROCESSOR),
            *(HubFile(repo, name, sizes.get(name, 0), optional=True) for name in _OPTIONAL_PROCESSOR))


TARGETS: dict[str, tuple[File, ...]] = {
    "sd15": (
        HubFile(SD15_REPO, "model_index.json"),
        *(HubFile(SD15_REPO, f"{sub}/config.json") for sub in MODEL_SUBFOLDERS),
        HubFile(SD15_REPO, "unet/diffusion_pytorch_model.safetensors", 3438,
                ("unet/diffusion_pytorch_model.bin",)),
        HubFile(SD15_REPO, "vae/diffusion_pytorch_model.safetensors", 335, ("vae/diffusion_pytorch_model.bin",)),
        HubFile(SD15_REPO, "text_encoder/model.safetensors", 492, ("text_encoder/pytorch_model.bin",)),
        *(HubFile(SD15_REPO, f"tokenizer/{name}", 0.5 if name in ("merges.txt", "vocab.json") else 0)
          for name in _TOKENIZER),
    ),
    "motion-adapter": (
        HubFile(ADAPTER_REPO, "config.json"),
        HubFile(ADAPTER_REPO, "diffusion_pytorch_model.safetensors", 1700, ("diffusion_pytorch_model.bin",)),
    ),
    **{f"sam2-{c.name}": (HubFile(c.hub_id, c.filename, c.size_mb),) for c in SAM2_CHECKPOINTS.values()},
    "clip": (
        HubFile(CLIP_REPO, "config.json"),
        HubFile(CLIP_REPO, "model.safetensors", 1710, ("pytorch_model.bin",)),
        *_processor(CLIP_REPO),
    ),
    "pickscore": (
        HubFile(PICKSCORE_REPO, "config.json"),
        HubFile(PICKSCORE_REPO, "model.safetensors", 3940, ("pytorch_model.bin",)),
        *_processor(PICKSCORE_PROCESSOR_REPO),  # PickScore_v1 is used with its base model's processor
    ),
    "sparsectrl-rgb": (  # vd edit --first-frame (stages.models.sparsectrl)
        HubFile(SPARSECTRL_REPO, "config.json"),
        HubFile(SPARSECTRL_REPO, "diffusion_pytorch_model.safetensors", 1990,
                ("diffusion_pytorch_model.fp16.safetensors",)),
    ),
    "grounding-dino": (  # vd mask --text (stages.models.detector)
        HubFile(DETECTOR_REPO, "config.json"),
        HubFile(DETECTOR_REPO, "model.safetensors", 689, ("pytorch_model.bin",)),
        HubFile(DETECTOR_REPO, "preprocessor_config.json"),
        HubFile(DETECTOR_REPO, "tokenizer_config.json"),
        HubFile(DETECTOR_REPO, "vocab.txt", 0.2),
        HubFile(DETECTOR_REPO, "tokenizer.json", 0.7, optional=True),
        HubFile(DETECTOR_REPO, "special_tokens_map.json", optional=True),
        HubFile(DETECTOR_REPO, "added_tokens.json", optional=True),
    ),
    "lpips": (  # torchvision's AlexNet + the LPIPS project's linear layers (what metrics.lpips_from_state_dict reads)
        UrlFile("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "lpips", "alexnet-owt-7be5be79.pth",
                "7be5be79", 244),
        UrlFile("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth", "lpips",
                "alex.pth", None, 0.01),
    ),
}
ALIASES = {"sam2": "sam2-large", "motion_adapter": "motion-adapter", "adapter": "motion-adapter",
           "sam2-base-plus": "sam2-base_plus", "sam2-base": "sam2-base_plus", "sd1.5": "sd15",
           "sparsectrl": "sparsectrl-rgb", "grounding_dino": "grounding-dino", "gdino": "grounding-dino"}
ALL = ("sd15", "motion-adapter", "sam2-large", "clip", "pickscore", "lpips")
NAMES = ("all", *TARGETS, "sam2")

# ------------------------------------------------------------------------------------- caches


def hub_cache() -> Path:
    """The Hugging Face hub cache folder (HF_HUB_CACHE / HF_HOME honoured, read at call time)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_snapshot(repo_id: str, need: Iterable[str | tuple[str, ...]] = ()) -> Path | None:
    """The cached snapshot folder of a Hub model repo holding every file in `need` (an entry that is a tuple
    of names: any one of them), or None. No network.

    The snapshot refs/main points to comes first, then the others newest first (a copied cache may lack
    refs). The cache layout is read directly: vd needs only some of a repo's files, and
    snapshot_download(local_files_only=True) refuses such a partial snapshot once the cache has stored the
    repo's full file list.
    """
    wanted = [(n,) if isinstance(n, str) else tuple(n) for n in need]
    try:
        repo_dir = hub_cache() / f"models--{repo_id.replace('/', '--')}"
        snaps_dir, ref = repo_dir / "snapshots", repo_dir / "refs" / "main"
        first = [snaps_dir / ref.read_text().strip()] if ref.is_file() else []
        others = sorted((p for p in snaps_dir.glob("*") if p.is_dir() and p not in first),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for snap in first + others:
            if snap.is_dir() and all(any((snap / n).is_file() for n in names) for names in wanted):
                return snap
    except Exception:  # a malformed cache folder reads as "not cached"; it must never break a lookup
        return None
    return None


def hub_file(repo_id: str, filename: str) -> Path | None:
    """A cached file of a Hub model repo (see `hub_snapshot`), or None."""
    snap = hub_snapshot(repo_id, (filename,))
    return snap / filename if snap is not None else None


def cached_name(f: HubFile) -> tuple[Path, str] | None:
    """(cached path, the name found) for `f` or one of its alternatives, or None."""
    for name in (f.filename, *f.alternatives):
        if (path := hub_file(f.repo_id, name)) is not None:
            return path, name
    return None


def hub_folder(repo_id: str, files: Iterable[File]) -> Path | None:
    """The cached snapshot folder of `repo_id` holding every required file of `files` that comes from it."""
    return hub_snapshot(repo_id, [(f.filename, *f.alternatives) for f in files
                                  if isinstance(f, HubFile) and f.repo_id == repo_id and not f.optional])


def locate(name: str) -> Path | None:
    """Where `vd models --get` put the weights of an evaluation model: 'clip', 'pickscore',
    'pickscore-processor' (a Hub snapshot folder) or 'lpips' (a folder); None when not (completely) there."""
    if name == "lpips":
        folder = vd_cache("lpips")
        return folder if all((folder / f.filename).is_file() for f in TARGETS["lpips"]) else None
    repo = {"clip": CLIP_REPO, "pickscore": PICKSCORE_REPO, "pickscore-processor": PICKSCORE_PROCESSOR_REPO}[name]
    return hub_folder(repo, TARGETS["pickscore" if name.startswith("pickscore") else name])
