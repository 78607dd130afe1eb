"""SD1.5's CLIP tokenizer built offline from the BPE table that ships inside the open-clip-torch wheel.

The vocabulary is derived from the merge table exactly like CLIP's own tokenizer does (256 byte symbols,
the same with an end-of-word marker, one entry per merge, then the two special tokens), which yields the
49408 ids of `openai/clip-vit-large-patch14` / SD1.5's tokenizer. `open_clip` itself is never imported
(it pulls in timm and torchvision); only its data file is read.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from stages.common.errors import ModelMissingError
from stages.models.catalog import CLIP_BPE_FILE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
# CLIP keeps the first 49152 - 256 - 2 merges of the table (the file holds more).
NUM_MERGES = 49152 - 256 - 2


def bpe_path() -> Path:
    """Location of the BPE merge table inside the installed open-clip-torch package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModelMissingError("CLIP BPE vocabulary not found: install open-clip-torch (pip install open-clip-torch)")
    path = Path(spec.origin).parent / CLIP_BPE_FILE
    if not path.is_file():
        raise ModelMissingError(f"CLIP BPE vocabulary missing at {path}: reinstall open-clip-torch")
    return path


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes used by byte-level BPE, in CLIP's vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    order, symbols = list(printable), [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def clip_vocab_and_merges(path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merge pairs) exactly as CLIP builds them from the gzip'd merge table."""
    lines = gzip.open(path or bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges  # type: ignore[return-value]


@lru_cache(maxsize=1)
def _cached_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return clip_vocab_and_merges()


def clip_tokenizer():
    """A transformers CLIPTokenizer with SD1.5's ids: BOS 49406, EOS 49407, padding with EOS to 77."""
    from transformers import CLIPTokenizer

    vocab, merges = _cached_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), unk_token=EOS, bos_token=BOS,
                         eos_token=EOS, pad_token=EOS, model_max_length=MAX_LENGTH)
