"""Zero-shot object detection from a phrase (Grounding DINO through transformers): `vd mask --text`.

The weights are IDEA-Research/grounding-dino-tiny (`vd models --get grounding-dino`), found in
$VD_GROUNDING_DINO (a folder), the Hugging Face cache, or given as a folder path. torch and transformers
are imported lazily so looking the weights up stays cheap.

A phrase is scored per detector query as the highest probability over the phrase's own tokens (not the
[CLS]/[SEP] tokens or the closing '.'); the query's box is the candidate. Boxes are in pixels of the image.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stages.common.errors import InputError, ModelMissingError, UsageError, first_line
from stages.models import catalog
from stages.models.catalog import DETECTOR_REPO, ENV_DETECTOR
from stages.models.sam2_track import pick_device
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# the Hub repo has preprocessor_config.json; transformers >= 5 saves processor_config.json instead
NEEDED = ("config.json", WEIGHT_FILES, ("preprocessor_config.json", "processor_config.json"),
          "tokenizer_config.json")
DEFAULT_THRESHOLD = 0.3  # Grounding DINO's usual box threshold is 0.35; a phrase-only score runs a little lower
DUPLICATE_IOU = 0.5  # candidates overlapping a better one this much are the same detection
GET = f"run `vd models --get grounding-dino` (about 690 MB), or set {ENV_DETECTOR} to a {DETECTOR_REPO} folder"
RANDOM = "random"  # --detector random: the tiny untrained detector (random_detector), no weights
RANDOM_NAME = "tiny-random"  # its name in every output (log, masks attrs, --json)
RANDOM_SEED = 0


@dataclass(frozen=True)
class Detection:
    """One candidate box (x0, y0, x1, y1) in image pixels and its phrase score in [0, 1]."""

    box: tuple[float, float, float, float]
    score: float


@dataclass
class Detector:
    """A loaded Grounding DINO: the model, its processor and the device they run on."""

    model: Any
    processor: Any
    device: str
    source: str


def _complete(folder: Path) -> bool:
    return all(any((folder / name).is_file() for name in ((n,) if isinstance(n, str) else n)) for n in NEEDED)


def find_detector(name: str = "auto") -> Path | None:
    """The folder of the detector weights for `name` ('auto' or a folder path), or None."""
    if name != "auto":
        path = Path(name).expanduser()
        return path if path.is_dir() and _complete(path) else None
    if os.environ.get(ENV_DETECTOR):
        path = Path(os.environ[ENV_DETECTOR]).expanduser()
        return path if path.is_dir() and _complete(path) else None
    return catalog.hub_snapshot(DETECTOR_REPO, NEEDED)


def resolve_detector(name: str = "auto") -> Path | str:
    """The detector folder to use (or RANDOM), else ModelMissingError (exit 4) / InputError saying what to do."""
    if name == RANDOM:
        return RANDOM
    found = find_detector(name)
    if found is not None:
        return found
    if name != "auto":
        what = "not found" if not Path(name).expanduser().exists() else "is not a Grounding DINO folder"
        raise InputError(f"--detector {name} {what} (needs config.json, model.safetensors and the processor "
                         f"files of {DETECTOR_REPO})")
    where = f" ({ENV_DETECTOR}={os.environ[ENV_DETECTOR]} is incomplete)" if os.environ.get(ENV_DETECTOR) else ""
    raise ModelMissingError(f"Grounding DINO weights for --text not found{where}; {GET}; "
                            f"or give the object by --box/--point (--detector random: untrained, tests only)")


def load_detector(folder: str | Path, device: str = "auto") -> Detector:
    """Load the model and its processor from `folder` (no network)."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    device = pick_device(device)
    try:
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a damaged or foreign folder: say which, not transformers' traceback
        raise InputError(f"{folder} is not a loadable Grounding DINO folder ({first_line(exc)[:160]})") from None
    return Detector(model.to(device).eval(), processor, device, str(folder))


def caption(phrase: str) -> str:
    """Grounding DINO's text form: lower case, ending with a period."""
    text = " ".join(phrase.lower().split()).rstrip(".")
    if not text:
        raise UsageError("--text needs a phrase (e.g. --text \"brown bear\")")
    return text + "."


def phrase_positions(input_ids: Sequence[int], tokenizer: Any) -> list[int]:
    """Token positions of the phrase itself: not special tokens, not the closing period."""
    special = set(tokenizer.all_special_ids)
    period = tokenizer.convert_tokens_to_ids(".")
    return [i for i, t in enumerate(input_ids) if int(t) not in special and int(t) != period]


def detect(detector: Detector, image: np.ndarray, phrase: str, limit: int = 8) -> list[Detection]:
    """Candidate boxes for `phrase` on uint8 `image` (H, W, 3), best first, near-duplicates removed."""
    import torch

    height, width = image.shape[:2]
    inputs = detector.processor(images=image, text=caption(phrase), return_tensors="pt")
    ids = [int(t) for t in inputs["input_ids"][0]]
    keep = phrase_positions(ids, detector.processor.tokenizer)
    if not keep:
        raise UsageError(f"--text {phrase!r} has no words the detector's vocabulary knows")
    with torch.inference_mode():
        out = detector.model(**{k: v.to(detector.device) for k, v in inputs.items()})
    probs = out.logits[0].float().sigmoid()[:, keep]  # (queries, phrase tokens)
    scores = probs.max(dim=1).values.cpu().numpy()
    cx, cy, bw, bh = out.pred_boxes[0].float().cpu().numpy().T
    boxes = np.stack([(cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width, (cy + bh / 2) * height], 1)
    boxes = np.clip(boxes, 0, [width, height, width, height])
    found: list[Detection] = []
    for q in np.argsort(-scores, kind="stable"):
        x0, y0, x1, y1 = (float(v) for v in boxes[q])
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        if any(box_iou((x0, y0, x1, y1), d.box) > DUPLICATE_IOU for d in found):
            continue
        found.append(Detection((x0, y0, x1, y1), float(scores[q])))
        if len(found) >= limit:
            break
    return found


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_parts(vocab_dir: Path, words: Sequence[str], seed: int) -> tuple[Any, Any]:
    """(model, processor) of a tiny untrained Grounding DINO (Swin + BERT from configs) whose word-level
    vocabulary (written to vocab_dir/vocab.txt) holds `words`; deterministic in `seed`."""
    import torch
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]
    vocab += [w for w in dict.fromkeys(w.lower() for w in words) if w not in vocab]
    (vocab_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(vocab_dir / "vocab.txt"))
    images = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 128})
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64)
    backbone = SwinConfig(image_size=128, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_indices=[2, 3, 4])
    # two decoder layers at least: the box heads of the later layers are tied to the first one's
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=12, max_text_len=32, encoder_n_points=2,
                                 decoder_n_points=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config).eval()
    return model, GroundingDinoProcessor(images, tokenizer)


def save_random_detector(folder: str | Path, words: Sequence[str], seed: int = 0) -> Path:
    """Write a tiny untrained Grounding DINO with a word-level vocabulary holding `words` to `folder`, loadable
    by `load_detector`: for tests and plumbing only (its boxes mean nothing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = _random_parts(folder, words, seed)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def phrase_words(phrases: Sequence[str]) -> list[str]:
    """The words and punctuation marks of `phrases` as a BERT tokenizer splits them (lower case)."""
    return [w for p in phrases for w in re.findall(r"\w+|[^\w\s]", p.lower())]


def random_detector(phrases: Sequence[str], device: str = "auto", seed: int = RANDOM_SEED) -> Detector:
    """`--detector random`: the tiny untrained Grounding DINO built in memory with the phrases' words as its
    vocabulary, seeded, named "tiny-random"; its boxes and scores mean nothing (plumbing only)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vd-detector-") as tmp:
        model, processor = _random_parts(Path(tmp), phrase_words(phrases), seed)
    device = pick_device(device)
    return Detector(model.to(device), processor, device, RANDOM_NAME)


def detector_status() -> dict[str, Any]:
    """The `vd models` component of the Grounding DINO weights (same keys as the other components)."""
    folder = find_detector()
    source = ENV_DETECTOR if os.environ.get(ENV_DETECTOR) else "hf-cache"
    return {"name": "grounding-dino", "present": folder is not None, "path": str(folder) if folder else None,
            "source": source, "get": None if folder else GET, "hub_id": DETECTOR_REPO, "used_by": "vd mask --text"}
