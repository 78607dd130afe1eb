"""Model identity from content only: the full sha256 of every weight file (all shards, all components, the
tokenizer) and the configs' own keys. Never from loaded objects (libraries add process-dependent keys), from
file locations or from file names, so a moved or renamed copy keeps its identity and any changed byte
(a LoRA merged into a middle layer) gives a new one.

A file in a Hugging Face cache is named by its hash (snapshots/<rev>/f -> blobs/<sha256> for LFS files):
that name is used as is. Other files are hashed once; the digest is cached under the vd cache
(<vd cache>/file-sha256/<device>-<inode>-<size>-<mtime_ns>), so an unchanged file is never read again.

stages.models.resolve finds a spec's identity without loading the model.
Identities look like "sd15-animatediff-v2-<20 hex>". Older vd versions wrote "sd15-animatediff-<16 hex>"
(size and first/last MiB of one file per component, names included): `is_legacy` tells them apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from stages.common.digest import digest
from stages.common.errors import InputError
from stages.models.catalog import MODEL_SUBFOLDERS, vd_cache

VERSION = "v2"
HASH_CACHE = "file-sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LEGACY = re.compile(r"sd15-animatediff-[0-9a-f]{16}")
_SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?P<ext>\.[A-Za-z0-9]+)")


def is_legacy(fingerprint: str | None) -> bool:
    """Whether `fingerprint` was written by an older vd (partial-content identity, not comparable)."""
    return bool(fingerprint) and bool(_LEGACY.fullmatch(str(fingerprint)))


def legacy_message(fingerprint: str, where: str) -> str:
    """The one line for an inversion whose model identity is of the old format."""
    return (f"the inversion in {where} was made with an older vd model identity ({fingerprint}); "
            f"rerun `vd invert {where} --restart`")


# ------------------------------------------------------------------------------------- file digests

def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face cache names `path` by (a symlink into blobs/<sha256>), else None."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name
    return None


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def file_sha256(path: Path) -> str:
    """Full sha256 of a file: the Hugging Face blob name, a cached digest, or computed once and cached."""
    path = Path(path)
    named = hub_blob_sha256(path)
    if named:
        return named
    real = path.resolve()
    try:
        entry = vd_cache(HASH_CACHE) / _cache_key(real)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        cached = entry.read_text().strip()
        if _SHA256.fullmatch(cached):
            return cached
    except OSError:
        pass
    h = hashlib.sha256()
    try:
        with open(real, "rb") as fh:
            for block in iter(lambda: fh.read(8 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    value = h.hexdigest()
    try:  # the cache only saves time: a read-only or full cache folder is not an error
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(value)
        os.replace(tmp, entry)
    except OSError:
        pass
    return value


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
    for p in files:
        p = Path(p)
        component = p.parent.name if p.parent.name in MODEL_SUBFOLDERS else ""
        for part in shard_files(p):
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
