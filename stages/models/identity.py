"""Model identity from content only: the full sha256 of every weight file diffusers / transformers load (all
shards, all components, the tokenizer) and the configs' own keys. Never from loaded objects (libraries add
process-dependent keys), from file locations or from file names, so a moved or renamed copy keeps its
identity and any changed byte (a LoRA merged into a middle layer) gives a new one.

Which files count is decided by stages.models.resolve with the same rule loading uses (so a backup such as
`diffusion_pytorch_model.orig.safetensors` beside the real file never counts). Every file is read and hashed
like any other, Hugging Face cache blobs included (their blobs/<sha256> names are not trusted, so a blob
edited in place gives a new identity); digests are reused through stages.common.digest.file_sha256, whose
cache key includes the ctime, so content replaced with the old mtime restored is read again.

stages.models.resolve finds a spec's identity without loading the model.
Identities look like "sd15-animatediff-v2-<20 hex>". Older vd versions wrote "sd15-animatediff-<16 hex>"
(size and first/last MiB of one file per component, names included): `is_legacy` tells them apart.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from stages.common.digest import digest, file_sha256
from stages.common.errors import InputError
from stages.models.catalog import MODEL_SUBFOLDERS

VERSION = "v2"
_LEGACY = re.compile(r"sd15-animatediff-[0-9a-f]{16}")
_SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?P<ext>\.[A-Za-z0-9]+)")


def is_legacy(fingerprint: str | None) -> bool:
    """Whether `fingerprint` was written by an older vd (partial-content identity, not comparable)."""
    return bool(fingerprint) and bool(_LEGACY.fullmatch(str(fingerprint)))


def legacy_message(fingerprint: str, where: str) -> str:
    """The one line for an inversion whose model identity is of the old format."""
    return (f"the inversion in {where} was made with an older vd model identity ({fingerprint}); "
            f"rerun `vd invert {where} --restart`")


# ------------------------------------------------------------------------------------- files

def shard_files(path: Path) -> list[Path]:
    """Every file a weight file stands for: all shards of a sharded checkpoint (in shard order) and their
    index files; just `path` otherwise."""
    path = Path(path)
    m = _SHARD.fullmatch(path.name)
    if not m:
        return [path]
    pattern = re.compile(re.escape(m["stem"]) + r"-\d{5}-of-" + m["count"] + re.escape(m["ext"]))
    shards = sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))
    names = {p.name for p in shards}
    indexes = []
    for candidate in sorted(path.parent.glob("*.index*.json")):
        try:
            weight_map = json.loads(candidate.read_text()).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if names & set(weight_map.values()):
            indexes.append(candidate)
    return shards + indexes


def tokenizer_files(folder: Path) -> list[Path]:
    """The files of a diffusers folder's tokenizer/ (the loader uses them when present)."""
    tok = Path(folder) / "tokenizer"
    return sorted(p for p in tok.iterdir() if p.is_file() and not p.name.startswith(".")) if tok.is_dir() else []


# ------------------------------------------------------------------------------------- identities

def config_identity(config: dict[str, Any]) -> dict[str, Any]:
    """A config's own settings: bookkeeping keys ("_*": class name, library version, the set-ordered
    `_use_default_values`, the load path; "*_version") dropped, so identity never depends on the process."""
    return {k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")}


def config_files(folder: Path, subfolders: tuple[str, ...]) -> list[dict[str, Any]]:
    """The raw config.json files of a diffusers folder's components, as written on disk (no defaults added)."""
    out = []
    for sub in subfolders:
        path = folder / sub / "config.json" if sub else folder / "config.json"
        try:
            out.append(config_identity(json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
    return out


def fingerprint(kind: str, files: list[Path], configs: list[dict[str, Any]]) -> str:
    """'<kind>-v2-<20 hex>' over the configs' own keys and the full content of each weight file given (with
    all its shards), labelled by component (unet/vae/text_encoder, never the file name or location), plus
    the tokenizer files of a diffusers folder."""
    h = hashlib.sha256(f"{kind}/{VERSION}".encode())
    h.update(json.dumps([config_identity(c) for c in configs], sort_keys=True, default=str).encode())
    tokenizers: list[Path] = []
    seen: set[Path] = set()
    for p in files:
        p = Path(p)
        component = p.parent.name if p.parent.name in MODEL_SUBFOLDERS else ""
        for part in shard_files(p):
            if part in seen:  # a resolved sharded checkpoint lists every shard; each counts once
                continue
            seen.add(part)
            h.update(f"\n{component}:{file_sha256(part)}".encode())
        if component and p.parent.parent not in tokenizers:
            tokenizers.append(p.parent.parent)
    for folder in tokenizers:  # names matter here: the tokenizer finds vocab.json and merges.txt by name
        for p in tokenizer_files(folder):
            h.update(f"\ntokenizer/{p.name}:{file_sha256(p)}".encode())
    return f"{kind}-{VERSION}-{h.hexdigest()[:20]}"


def random_fingerprint(spec: str, seed: int, configs: tuple[dict[str, Any], ...]) -> str:
    """'<spec>-<seed>-<12 hex of the configs>' of a model built with random weights."""
    return f"{spec}-{seed}-{digest(list(configs), length=12)}"
