"""`vd models --get`: download exactly the weight files vd uses, into the caches its loaders search.

Hub files go into the standard Hugging Face cache (blobs/<etag>, snapshots/<commit>/<file>, refs/main), so
`snapshot_download(local_files_only=True)`, `try_to_load_from_cache` and `from_pretrained(local_files_only=True)`
find them. Files that are not on the Hub (LPIPS) go into ~/.cache/vd/<name>/.

Every download is resumable across runs: bytes go to a partial file (`blobs/<etag>.incomplete`, `<file>.part`)
that the next attempt continues with an HTTP Range request, and only a complete, verified file is renamed into
place. Verification: a Hub file against its ETag (sha256 for LFS files, git blob sha1 otherwise) and its size; a
URL file against its published sha256 (or prefix) when there is one, else the size announced by the server.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit

from stages.common.errors import ModelMissingError, UsageError
from stages.common.progress import Progress
from stages.common.errors import first_line

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # == stages.models.load.SD15_REPO (kept import-light)
ADAPTER_REPO = "guoyww/animatediff-motion-adapter-v1-5-3"  # == stages.models.load.ADAPTER_REPO
CLIP_REPO = "openai/clip-vit-large-patch14"
PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MIRROR_ENV = "VD_DOWNLOAD_MIRROR"  # http(s)://host[/prefix]: fetch https://a.b/c from {mirror}/a.b/c instead
CHUNK = 1 << 20
RETRIES = 5


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
    """One file from an official URL, stored as ~/.cache/vd/<folder>/<filename>."""

    url: str
    folder: str
    filename: str
    sha256: str | None = None  # the published digest, or the published prefix of it (torchvision's names)
    size_mb: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.folder}/{self.filename}"


File = HubFile | UrlFile


def _sam2(name: str, size_mb: int) -> tuple[HubFile, ...]:
    return (HubFile(f"facebook/sam2.1-hiera-{name.replace('_', '-')}", f"sam2.1_hiera_{name}.pt", size_mb),)


_TOKENIZER = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
_PROCESSOR = ("preprocessor_config.json", "tokenizer_config.json", "vocab.json", "merges.txt")
_OPTIONAL_PROCESSOR = ("tokenizer.json", "special_tokens_map.json")

TARGETS: dict[str, tuple[File, ...]] = {
    "sd15": (
        HubFile(SD15_REPO, "model_index.json"),
        *(HubFile(SD15_REPO, f"{sub}/config.json") for sub in ("unet", "vae", "text_encoder")),
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
    **{f"sam2-{name}": _sam2(name, size) for name, size in
       (("tiny", 156), ("small", 184), ("base_plus", 324), ("large", 898))},
    "clip": (
        HubFile(CLIP_REPO, "config.json"),
        HubFile(CLIP_REPO, "model.safetensors", 1710, ("pytorch_model.bin",)),
        *(HubFile(CLIP_REPO, name, 1.0 if name in ("vocab.json", "tokenizer.json") else 0.5 if name == "merges.txt"
                  else 0) for name in _PROCESSOR),
        *(HubFile(CLIP_REPO, name, 2.0 if name == "tokenizer.json" else 0, optional=True)
          for name in _OPTIONAL_PROCESSOR),
    ),
    "pickscore": (
        HubFile(PICKSCORE_REPO, "config.json"),
        HubFile(PICKSCORE_REPO, "model.safetensors", 3940, ("pytorch_model.bin",)),
        # PickScore_v1 is used with the processor of the CLIP-H it was fine-tuned from
        *(HubFile(PICKSCORE_PROCESSOR_REPO, name, 1.0 if name == "vocab.json" else 0.5 if name == "merges.txt"
                  else 0) for name in _PROCESSOR),
        *(HubFile(PICKSCORE_PROCESSOR_REPO, name, 2.0 if name == "tokenizer.json" else 0, optional=True)
          for name in _OPTIONAL_PROCESSOR),
    ),
    "lpips": (  # torchvision's AlexNet + the LPIPS project's linear layers (what metrics.lpips_from_state_dict reads)
        UrlFile("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "lpips", "alexnet-owt-7be5be79.pth",
                "7be5be79", 244),
        UrlFile("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth", "lpips",
                "alex.pth", None, 0.01),
    ),
}
ALIASES = {"sam2": "sam2-large", "motion_adapter": "motion-adapter", "adapter": "motion-adapter",
           "sam2-base-plus": "sam2-base_plus", "sam2-base": "sam2-base_plus", "sd1.5": "sd15"}
ALL = ("sd15", "motion-adapter", "sam2-large", "clip", "pickscore", "lpips")
NAMES = ("all", *TARGETS, "sam2")


def parse_names(names: Iterable[str]) -> list[str]:
    """Canonical target names (commas allowed, `all` expanded, order kept, duplicates dropped)."""
    out: list[str] = []
    for raw in names:
        for item in filter(None, (s.strip().lower() for s in str(raw).split(","))):
            name = ALIASES.get(item, item)
            if name == "all":
                new = list(ALL)
            elif name in TARGETS:
                new = [name]
            else:
                raise UsageError(f"unknown weights {item!r}: use {', '.join(NAMES)}")
            out += [n for n in new if n not in out]
    if not out:
        raise UsageError(f"--get needs names: {', '.join(NAMES)}")
    return out


# ------------------------------------------------------------------------------------------ locations

def vd_cache(folder: str) -> Path:
    """~/.cache/vd/<folder> (XDG_CACHE_HOME honoured), where files that are not on the Hub go."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "vd" / folder


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _storage(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return _hub_cache() / repo_folder_name(repo_id=repo_id, repo_type="model")


def _cached(repo_id: str, filename: str) -> Path | None:
    """The cached file at the commit refs/main points to, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(_hub_cache()))
    except Exception:  # a malformed cache folder reads as "not cached"
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _cached_any(f: HubFile) -> tuple[Path, str] | None:
    """(cached path, the name found) for `f` or one of its alternatives."""
    for name in (f.filename, *f.alternatives):
        if (path := _cached(f.repo_id, name)) is not None:
            return path, name
    return None


def _snapshot_root(path: Path, filename: str) -> Path:
    for _ in filename.split("/"):
        path = path.parent
    return path


def hub_folder(repo_id: str, files: Sequence[File]) -> Path | None:
    """The cached snapshot folder of `repo_id` when every required file of `files` from it is there."""
    root = None
    for f in files:
        if not isinstance(f, HubFile) or f.repo_id != repo_id:
            continue
        found = _cached_any(f)
        if found is None:
            if f.optional:
                continue
            return None
        root = root or _snapshot_root(*found)
    return root


def locate(name: str) -> Path | None:
    """Where `vd models --get` put the weights of an evaluation model: 'clip', 'pickscore',
    'pickscore-processor' (a Hub snapshot folder) or 'lpips' (a folder); None when not (completely) there."""
    if name == "lpips":
        folder = vd_cache("lpips")
        return folder if all((folder / f.filename).is_file() for f in TARGETS["lpips"]) else None
    repo = {"clip": CLIP_REPO, "pickscore": PICKSCORE_REPO, "pickscore-processor": PICKSCORE_PROCESSOR_REPO}[name]
    return hub_folder(repo, TARGETS["pickscore" if name.startswith("pickscore") else name])


def eval_status() -> list[dict[str, Any]]:
    """`vd models` components for the evaluation models (same keys as stages.models.load.models_status)."""
    out = []
    for name, env, used_by in (("clip", "VD_CLIP", "vd eval --metrics clip"),
                               ("pickscore", "VD_PICKSCORE", "vd eval --metrics pickscore"),
                               ("lpips", "VD_LPIPS", "vd eval --metrics lpips")):
        extra: dict[str, Any] = {"used_by": used_by}
        hub = [f for f in TARGETS[name] if isinstance(f, HubFile)]
        if hub:
            extra["hub_id"] = hub[0].repo_id
        else:
            extra["url"] = [f.url for f in TARGETS[name] if isinstance(f, UrlFile)]
        if os.environ.get(env):
            path = Path(os.environ[env]).expanduser()
            present, source = path.exists(), env
        else:
            path, source = locate(name), "hf-cache" if hub else "vd-cache"
            if name == "pickscore" and path is not None and locate("pickscore-processor") is None \
                    and not os.environ.get("VD_PICKSCORE_PROCESSOR"):
                path = None  # the model alone cannot score: its processor files are part of `--get pickscore`
            present = path is not None
        out.append({"name": name, "present": present, "path": str(path) if present else None, "source": source,
                    "get": None if present else f"vd models --get {name}, or set {env}", **extra})
    return out


# ------------------------------------------------------------------------------------------ transfer

class Unreachable(Exception):
    """The server could not be contacted at all (offline, DNS, refused): no point trying other files."""


class TransferError(Exception):
    """A file could not be downloaded or verified; the message is one line."""


def mirrored(url: str) -> str:
    """`url` rewritten onto $VD_DOWNLOAD_MIRROR (https://a.b/c -> {mirror}/a.b/c) when that is set."""
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    if not mirror:
        return url
    parts = urlsplit(url)
    return f"{mirror}/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def _ssl_context() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


def _open(url: str, headers: dict[str, str], method: str = "GET") -> Any:
    req = urllib.request.Request(url, headers={**headers, "Accept-Encoding": "identity"}, method=method)
    ctx = _ssl_context() if url.startswith("https:") else None
    return urllib.request.urlopen(req, timeout=30, context=ctx)


def _unreachable(exc: BaseException) -> bool:
    """A failure to connect at all (refused, DNS, TLS, timeout), as opposed to a transfer that broke off."""
    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror)) \
        and not isinstance(exc, urllib.error.HTTPError)


def _total_from(resp: Any, have: int) -> int | None:
    rng = resp.headers.get("Content-Range")  # bytes START-END/TOTAL
    if rng and (m := re.match(r"bytes\s+(\d+)-\d+/(\d+)", rng)):
        return int(m.group(2))
    length = resp.headers.get("Content-Length")
    return int(length) + (have if resp.status == 206 else 0) if length and length.isdigit() else None


def fetch_to_part(url: str, part: Path, size: int | None, headers: dict[str, str] | None = None,
                  on_bytes: Callable[[int], None] = lambda n: None, sleep: float = 0.5) -> int | None:
    """Download `url` into `part`, continuing what is already there with a Range request.

    A dropped connection is retried (with Range) while data keeps coming. Returns the size the server
    announced (None when it did not say). Raises Unreachable when the server cannot be contacted at all and
    TransferError for other failures; `part` is kept for the next attempt.
    """
    headers = dict(headers or {})
    part.parent.mkdir(parents=True, exist_ok=True)
    failures, total = 0, size
    while True:
        have = part.stat().st_size if part.exists() else 0
        if total is not None and have == total:
            return total
        if total is not None and have > total:  # a stale partial file of another version
            part.unlink()
            on_bytes(-have)
            have = 0
        req_headers = {**headers, **({"Range": f"bytes={have}-"} if have else {})}
        received = 0
        try:
            with _open(url, req_headers) as resp:
                if have and resp.status != 206:  # the server ignored the range: start over
                    on_bytes(-have)
                    have = 0
                announced = _total_from(resp, have)
                if announced is not None:
                    if total is not None and announced != total:
                        raise TransferError(f"server announced {announced} bytes, expected {total}")
                    total = announced
                with open(part, "ab" if have else "wb") as fh:
                    while chunk := resp.read(CHUNK):
                        fh.write(chunk)
                        received += len(chunk)
                        on_bytes(len(chunk))
            if total is None or part.stat().st_size >= total:
                return total
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # range beyond the end: the partial file is stale
                part.unlink()
                failures += 1
            elif exc.code in (408, 429, 500, 502, 503, 504):
                failures += 1
            else:
                raise TransferError(f"HTTP {exc.code} {exc.reason}") from None
        except TransferError:
            raise
        except (OSError, http.client.HTTPException, urllib.error.URLError) as exc:
            if received == 0 and _unreachable(exc):
                raise Unreachable(f"{urlsplit(url).netloc}: {_reason(exc)}") from None
            failures = 0 if received else failures + 1
        if failures > RETRIES:
            raise TransferError(f"download kept failing (partial file kept: {part})")
        time.sleep(sleep * max(failures, 1))


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = first_line(reason)
    return text[:120]


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one pass."""
    sha, git = hashlib.sha256(), hashlib.sha1()
    git.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK * 8):
            sha.update(chunk)
            git.update(chunk)
    return sha.hexdigest(), git.hexdigest()


def verify(path: Path, size: int | None, etag: str | None = None, sha256: str | None = None) -> tuple[str, str]:
    """Check size, then a Hub ETag (64 hex = sha256 of an LFS file, 40 hex = git blob sha1) or a published
    sha256 / prefix. Returns (sha256, what was checked); raises TransferError on a mismatch."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise TransferError(f"size {actual} bytes, expected {size}")
    digest, git = file_hashes(path)
    etag = (etag or "").lower()
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        if digest != etag:
            raise TransferError(f"sha256 {digest[:12]}... does not match {etag[:12]}...")
        return digest, "sha256"
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        if git != etag:
            raise TransferError(f"git sha1 {git[:12]}... does not match {etag[:12]}...")
        return digest, "git-sha1"
    if sha256:
        if not digest.startswith(sha256.lower()):
            raise TransferError(f"sha256 {digest[:12]}... does not match the published {sha256[:12]}...")
        return digest, "sha256" if len(sha256) == 64 else "sha256-prefix"
    return digest, "size" if size is not None else "none"


# ------------------------------------------------------------------------------------------ planning

@dataclass
class _Job:
    target: str
    file: File
    status: str = "pending"  # cached | download | skipped | failed | downloaded
    path: Path | None = None
    url: str | None = None
    size: int | None = None
    etag: str | None = None
    commit: str | None = None
    filename: str | None = None  # the Hub name actually used (an alternative may stand in)
    sha256: str | None = None
    verified: str | None = None
    error: str | None = None

    def result(self) -> dict[str, Any]:
        f = self.file
        out: dict[str, Any] = {"name": self.target, "file": f.label, "status": self.status,
                               "path": str(self.path) if self.path else None, "size": self.size,
                               "sha256": self.sha256, "verified": self.verified, "error": self.error}
        if isinstance(f, HubFile):
            out.update(repo_id=f.repo_id, filename=self.filename or f.filename)
        else:
            out.update(url=f.url)
        return out


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode()) if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE


def _plan_hub(job: _Job, state: dict[str, Any]) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    f = job.file
    assert isinstance(f, HubFile)
    if state["down"] is not None:  # no network: what is cached counts, the rest fails
        found = _cached_any(f)
        if found is not None:
            job.status, (job.path, job.filename) = "cached", found
            job.size = job.path.stat().st_size
        elif f.optional:
            job.status = "skipped"
        else:
            job.status, job.error = "failed", state["down"]
        return
    for name in (f.filename, *f.alternatives):
        try:
            meta = get_hf_file_metadata(hf_hub_url(f.repo_id, name), timeout=30)
        except EntryNotFoundError:
            job.error = "not in the repo"
            continue
        except OfflineModeIsEnabled:
            state["down"] = "offline (HF_HUB_OFFLINE=1)"
            return _plan_hub(job, state)
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                job.error = "not in the repo"
                continue
            job.status, job.error = "failed", f"HTTP {_reason(exc)}"
            return
        except Exception as exc:
            if not _network_error(exc):
                raise
            state["down"] = f"cannot reach {_endpoint()} ({type(exc).__name__}: {_reason(exc)})"
            return _plan_hub(job, state)
        if not meta.commit_hash or not meta.etag:
            job.status, job.error = "failed", f"{_endpoint()} sent no X-Repo-Commit/ETag header"
            return
        job.filename, job.etag, job.size, job.url = name, meta.etag, meta.size, meta.location
        job.commit = meta.commit_hash
        job.error = None
        storage = _storage(f.repo_id)
        pointer = storage / "snapshots" / meta.commit_hash / name
        if pointer.is_file() and (meta.size is None or pointer.stat().st_size == meta.size):
            job.status, job.path = "cached", pointer
        elif (storage / "blobs" / meta.etag).is_file():  # same content under another commit
            try:
                job.status, job.path = "cached", _link(f.repo_id, name)
            except TransferError as exc:
                job.status, job.error = "failed", str(exc)
        else:
            job.status = "download"
        return
    job.status = "skipped" if f.optional else "failed"
    if f.optional:
        job.error = "not in the repo (optional)"


def _network_error(exc: BaseException) -> bool:
    """Connection/timeout errors of whichever HTTP client huggingface_hub uses (httpx, requests, urllib)."""
    return isinstance(exc, OSError) or any(c.__name__ in ("TransportError", "RequestError", "TimeoutException")
                                           for c in type(exc).__mro__)


def _plan_url(job: _Job, state: dict[str, Any]) -> None:
    f = job.file
    assert isinstance(f, UrlFile)
    dest = vd_cache(f.folder) / f.filename
    if dest.is_file():
        job.status, job.path, job.size = "cached", dest, dest.stat().st_size
        return
    if state["down"] is not None and state["down"].startswith("offline"):
        job.status, job.error = "failed", state["down"]
        return
    job.url = mirrored(f.url)
    try:
        with _open(job.url, {"User-Agent": "vd"}, method="HEAD") as resp:
            length = resp.headers.get("Content-Length")
            job.size = int(length) if length and length.isdigit() else None
    except urllib.error.HTTPError as exc:
        if exc.code not in (403, 405, 501):  # servers that refuse HEAD still serve GET
            job.status, job.error = "failed", f"HTTP {exc.code} {exc.reason}"
            return
    except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
        job.status, job.error = "failed", f"cannot reach {urlsplit(job.url).netloc} ({_reason(exc)})"
        return
    job.status = "download"


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _link(repo_id: str, filename: str) -> Path:
    """Let huggingface_hub create snapshots/<commit>/<file> and refs/main for a blob already in place."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=str(_hub_cache()), etag_timeout=30))
    except Exception as exc:  # the blob stays; the next run links it
        raise TransferError(f"could not link the cached file ({type(exc).__name__}: {_reason(exc)})") from None


# ------------------------------------------------------------------------------------------ download

def _hub_headers(url: str) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    headers = dict(build_hf_headers())
    if urlsplit(url).netloc != urlsplit(_endpoint()).netloc:  # a CDN: never send the token there
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    return headers


def _paths(job: _Job) -> tuple[Path, Path]:
    """(partial file, final file) of a download."""
    f = job.file
    if isinstance(f, HubFile):
        assert job.etag
        blobs = _storage(f.repo_id) / "blobs"
        return blobs / f"{job.etag}.incomplete", blobs / job.etag
    dest = vd_cache(f.folder) / f.filename
    return dest.with_name(dest.name + ".part"), dest


def _refresh_location(job: _Job) -> None:
    """Resolve the file again right before its download: CDN links are signed and expire, and the plan may
    be hours old after large files. Pinned to the planned commit, so the content cannot change."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    assert isinstance(job.file, HubFile) and job.filename and job.commit
    try:
        meta = get_hf_file_metadata(hf_hub_url(job.file.repo_id, job.filename, revision=job.commit), timeout=30)
    except Exception as exc:
        if _network_error(exc):
            raise Unreachable(f"{_endpoint()} ({type(exc).__name__}: {_reason(exc)})") from None
        raise TransferError(_reason(exc)) from None
    if meta.etag != job.etag:
        raise TransferError(f"ETag changed at commit {job.commit[:12]} ({job.etag} -> {meta.etag})")
    job.url = meta.location


def _download(job: _Job, on_bytes: Callable[[int], None]) -> None:
    f = job.file
    part, dest = _paths(job)
    if isinstance(f, HubFile):
        from huggingface_hub.utils import WeakFileLock

        _refresh_location(job)
        assert job.url and job.etag and job.filename
        storage = _storage(f.repo_id)
        lock = storage.parent / ".locks" / storage.name / f"{job.etag}.lock"  # the lock huggingface_hub takes
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(str(lock)):
            if not dest.is_file():
                _fetch_verify(job, part, dest, _hub_headers(job.url), on_bytes, etag=job.etag)
        job.path = _link(f.repo_id, job.filename)
    else:
        _fetch_verify(job, part, dest, {"User-Agent": "vd"}, on_bytes, sha256=f.sha256)
        job.path = dest
    job.status = "downloaded"


def _fetch_verify(job: _Job, part: Path, dest: Path, headers: dict[str, str], on_bytes: Callable[[int], None],
                  etag: str | None = None, sha256: str | None = None) -> None:
    assert job.url
    job.size = fetch_to_part(job.url, part, job.size, headers, on_bytes)
    try:
        job.sha256, job.verified = verify(part, job.size, etag=etag, sha256=sha256)
    except TransferError as exc:
        part.unlink(missing_ok=True)  # complete but wrong: resuming it would only repeat the error
        raise TransferError(f"{exc}; deleted") from None
    os.replace(part, dest)


def get(names: Iterable[str], progress: Progress | None = None) -> dict[str, Any]:
    """Download (or find already cached) every file of the named targets.

    Returns {"names", "files": [per-file results], "downloaded", "cached", "failed", "bytes", "seconds"}.
    Raises DownloadFailed (a ModelMissingError, exit 4) naming the files it could not get; its `.result`
    holds the per-file results.
    """
    progress = progress or Progress(quiet=True)
    targets = parse_names(names)
    start = time.monotonic()
    jobs = [_Job(t, f) for t in targets for f in TARGETS[t]]
    state: dict[str, Any] = {"down": "offline (HF_HUB_OFFLINE=1)" if _offline() else None}
    for job in jobs:
        (_plan_hub if isinstance(job.file, HubFile) else _plan_url)(job, state)
    todo = [j for j in jobs if j.status == "download"]
    moved = {"net": 0, "bar": 0, "shown": 0}  # bytes received; bytes on disk (resumed parts count); MB shown
    if todo:
        total = sum(j.size if j.size is not None else int(j.file.size_mb * 1e6) for j in todo)
        resumed = sum(p.stat().st_size for j in todo if (p := _paths(j)[0]).is_file())
        note = f" ({human_size(resumed)} already there from an interrupted run)" if resumed else ""
        progress.log(f"downloading {len(todo)} file(s), {human_size(total)}{note}")
        with progress.task("download MB", total=max(1, round(total / 1e6))) as advance:
            def on_bytes(n: int, on_disk: bool = False) -> None:
                moved["bar"] += n
                moved["net"] += max(n, 0) if not on_disk else 0
                mb = int(moved["bar"] / 1e6)
                if mb != moved["shown"]:
                    advance(mb - moved["shown"], file=moved.get("file", ""))
                    moved["shown"] = mb

            for job in todo:
                moved["file"] = job.filename or job.file.filename
                part = _paths(job)[0]
                on_bytes(part.stat().st_size if part.is_file() else 0, on_disk=True)
                try:
                    _download(job, on_bytes)
                    progress.log(f"{job.file.label}: {human_size(job.size or 0)}, {job.verified} verified")
                except Unreachable as exc:
                    job.status, job.error = "failed", f"cannot reach {exc}"
                except TransferError as exc:
                    job.status, job.error = "failed", str(exc)
    results = [j.result() for j in jobs]
    counts = {s: sum(j.status == s for j in jobs) for s in ("downloaded", "cached", "skipped", "failed")}
    result = {"names": targets, "files": results, **counts, "bytes": moved["net"],
              "seconds": round(time.monotonic() - start, 3)}
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        raise DownloadFailed(_failure_line(failed), result)
    return result


class DownloadFailed(ModelMissingError):
    """Some files could not be downloaded or verified (exit 4); `.result` has the per-file results."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


def _failure_line(failed: list[_Job]) -> str:
    by_reason: dict[str, list[str]] = {}
    for job in failed:
        by_reason.setdefault(job.error or "failed", []).append(job.file.label)
    parts = [f"{', '.join(labels)} ({reason})" for reason, labels in by_reason.items()]
    hint = "; rerun with network access (partial downloads continue)" \
        if any(r.startswith(("offline", "cannot reach")) for r in by_reason) else ""
    return f"could not get {len(failed)} file(s): " + "; ".join(parts) + hint


def human_size(n: float) -> str:
    """Bytes as '4.3 GB' / '335.0 MB' / '12 B'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
