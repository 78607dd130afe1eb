"""`vd models --get`: download exactly the weight files vd uses, into the caches its loaders search.

Hub files are fetched by huggingface_hub (`hf_hub_download`, revision main) into the standard Hugging Face
cache, Xet storage included; the Hub's metadata (`model_info(files_metadata=True)`) says which files exist,
their sizes and their hashes, and every downloaded file is checked against them (sha256 for LFS files, the
git blob sha1 otherwise). A connection that drops mid-file is resumed by huggingface_hub within the run.
Files that are not on the Hub (LPIPS) go through stages.models.transfer into <vd cache>/<name>/, resumable
across runs and checked against their published sha256 (or prefix) when there is one.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from stages.common.errors import ModelMissingError, UsageError
from stages.common.progress import Progress
from stages.common.cache import vd_cache
from stages.models.catalog import ALIASES, ALL, NAMES, TARGETS, File, HubFile, UrlFile, cached_name, hub_cache
from stages.models.transfer import (TransferError, Unreachable, fetch_to_part, mirrored, open_url, reason,
                                    verify)


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


def human_size(n: float) -> str:
    """Bytes as '4.3 GB' / '335.0 MB' / '12 B'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class _Job:
    target: str
    file: File
    status: str = "pending"  # cached | download | skipped | failed | downloaded
    path: Path | None = None
    size: int | None = None  # expected (from the Hub's metadata or the server), then actual
    filename: str | None = None  # the Hub name actually used (an alternative may stand in)
    want_sha256: str | None = None  # what the file must hash to (Hub LFS metadata, published digest)
    want_git: str | None = None  # the git blob sha1 of a Hub file that is not in LFS
    url: str | None = None
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


# ------------------------------------------------------------------------------------------ Hub files

def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _network_error(exc: BaseException | None) -> bool:
    """Connection/timeout errors of the HTTP client huggingface_hub uses, directly or as the cause."""
    while exc is not None:
        if isinstance(exc, OSError) or any(c.__name__ in ("TransportError", "TimeoutException")
                                           for c in type(exc).__mro__):
            return True
        exc = exc.__cause__
    return False


def _from_cache(jobs: list[_Job], why: str) -> None:
    """Without the Hub: what is cached counts, the rest fails with `why` (optional files are skipped)."""
    for job in jobs:
        assert isinstance(job.file, HubFile)
        found = cached_name(job.file)
        if found is not None:
            job.status, (job.path, job.filename) = "cached", found
            job.size = job.path.stat().st_size
        elif job.file.optional:
            job.status, job.error = "skipped", "not in the cache (optional)"
        else:
            job.status, job.error = "failed", why


def _plan_repo(repo_id: str, jobs: list[_Job], state: dict[str, Any]) -> None:
    """Match the jobs of one repo against the Hub's file list at main: name, size, hashes, cached or not."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    if state["down"] is None:
        try:
            info = HfApi().model_info(repo_id, revision="main", files_metadata=True, timeout=30)
        except OfflineModeIsEnabled:
            state["down"] = "offline (HF_HUB_OFFLINE=1)"
        except RepositoryNotFoundError as exc:  # gated repos too: access needs accepted terms and a token
            why = ("gated repository: accept its terms on the Hub, then `hf auth login`"
                   if isinstance(exc, GatedRepoError) else f"repository not found on {_endpoint()}")
            for job in jobs:
                job.status, job.error = "failed", why
            return
        except HfHubHTTPError as exc:
            for job in jobs:
                job.status, job.error = "failed", f"HTTP {reason(exc)}"
            return
        except Exception as exc:
            if not _network_error(exc):
                raise
            state["down"] = f"cannot reach {_endpoint()} ({type(exc).__name__}: {reason(exc)})"
    if state["down"] is not None:
        return _from_cache(jobs, state["down"])
    files = {s.rfilename: s for s in info.siblings or []}
    for job in jobs:
        f = job.file
        assert isinstance(f, HubFile)
        name = next((n for n in (f.filename, *f.alternatives) if n in files), None)
        if name is None:
            job.status = "skipped" if f.optional else "failed"
            job.error = "not in the repo" + (" (optional)" if f.optional else "")
            continue
        meta = files[name]
        job.filename = name
        job.size = meta.lfs.size if meta.lfs else meta.size
        job.want_sha256, job.want_git = (meta.lfs.sha256, None) if meta.lfs else (None, meta.blob_id)
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(hub_cache()), revision=info.sha)
        job.path = Path(found) if isinstance(found, str) and Path(found).is_file() else None
        # a cached copy of the wrong size is downloaded again (`_download_hub` forces it)
        job.status = "cached" if job.path is not None and job.path.stat().st_size == job.size else "download"


def _byte_counter(on_bytes: Callable[[int], None]) -> type:
    """A tqdm class for huggingface_hub that shows nothing and reports every byte to `on_bytes`."""
    from tqdm import tqdm

    class Bytes(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            on_bytes(int(n or 0))
            return None

        def update_transfer(self, n: int) -> None:  # Xet's network bytes: counted once, through update()
            pass

        def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

    return Bytes


def _discard(path: Path) -> None:
    """Remove a refused file from the Hugging Face cache: its snapshot entry, its blob, emptied folders."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    folder = path.parent
    while folder.name != "snapshots" and folder.parent != folder:
        try:
            folder.rmdir()
        except OSError:  # not empty
            break
        folder = folder.parent


def _download_hub(job: _Job, on_bytes: Callable[[int], None]) -> None:
    from huggingface_hub import hf_hub_download

    f = job.file
    assert isinstance(f, HubFile) and job.filename
    try:
        path = Path(hf_hub_download(f.repo_id, job.filename, revision="main", cache_dir=str(hub_cache()),
                                    etag_timeout=30, tqdm_class=_byte_counter(on_bytes),
                                    force_download=job.path is not None))
    except Exception as exc:
        if _network_error(exc):
            cause = exc.__cause__ or exc
            raise Unreachable(f"{_endpoint()} ({type(cause).__name__}: {reason(cause)})") from None
        raise TransferError(reason(exc)) from None
    try:
        job.sha256, job.verified = verify(path, job.size, sha256=job.want_sha256, git_sha1=job.want_git)
    except TransferError as exc:
        _discard(path)  # complete but wrong: keeping it would let the loaders use it
        raise TransferError(f"{exc}; deleted") from None
    job.path = path


# ------------------------------------------------------------------------------------------ URL files

def _plan_url(job: _Job, state: dict[str, Any]) -> None:
    import http.client
    import urllib.error

    f = job.file
    assert isinstance(f, UrlFile)
    dest = vd_cache(f.folder) / f.filename
    if dest.is_file():
        job.status, job.path, job.size = "cached", dest, dest.stat().st_size
        return
    if state["offline"]:
        job.status, job.error = "failed", "offline (HF_HUB_OFFLINE=1)"
        return
    job.url, job.want_sha256 = mirrored(f.url), f.sha256
    try:
        with open_url(job.url, {"User-Agent": "vd"}, method="HEAD") as resp:
            length = resp.headers.get("Content-Length")
            job.size = int(length) if length and length.isdigit() else None
    except urllib.error.HTTPError as exc:
        if exc.code not in (403, 405, 501):  # servers that refuse HEAD still serve GET
            job.status, job.error = "failed", f"HTTP {exc.code} {exc.reason}"
            return
    except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
        from urllib.parse import urlsplit

        job.status, job.error = "failed", f"cannot reach {urlsplit(job.url).netloc} ({reason(exc)})"
        return
    job.status = "download"


def _part(job: _Job) -> Path:
    """The partial file of a URL download (what a later run continues)."""
    return vd_cache(job.file.folder) / f"{job.file.filename}.part"  # type: ignore[union-attr]


def _download_url(job: _Job, on_bytes: Callable[[int], None]) -> None:
    assert job.url and isinstance(job.file, UrlFile)
    part, dest = _part(job), vd_cache(job.file.folder) / job.file.filename
    job.size = fetch_to_part(job.url, part, job.size, {"User-Agent": "vd"}, on_bytes)
    try:
        job.sha256, job.verified = verify(part, job.size, sha256=job.want_sha256)
    except TransferError as exc:
        part.unlink(missing_ok=True)  # complete but wrong: resuming it would only repeat the error
        raise TransferError(f"{exc}; deleted") from None
    os.replace(part, dest)
    job.path = dest


# ------------------------------------------------------------------------------------------ the command

@contextlib.contextmanager
def _hub_quiet() -> Iterator[None]:
    """huggingface_hub's own warnings (retries, resumed transfers) off: failures come back as one line."""
    from huggingface_hub.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def get(names: Iterable[str], progress: Progress | None = None) -> dict[str, Any]:
    """Download (or find already cached) every file of the named targets.

    Returns {"names", "files": [per-file results], "downloaded", "cached", "skipped", "failed", "bytes",
    "seconds"}. Raises DownloadFailed (a ModelMissingError, exit 4) naming the files it could not get; its
    `.result` holds the per-file results.
    """
    progress = progress or Progress(quiet=True)
    targets = parse_names(names)
    start = time.monotonic()
    jobs = [_Job(t, f) for t in targets for f in TARGETS[t]]
    offline = _offline()
    state: dict[str, Any] = {"down": "offline (HF_HUB_OFFLINE=1)" if offline else None, "offline": offline}
    moved = {"net": 0, "bar": 0, "shown": 0, "job": 0}  # bytes received (all, this job); bytes on disk; MB shown
    with _hub_quiet():
        by_repo: dict[str, list[_Job]] = {}
        for job in jobs:
            if isinstance(job.file, HubFile):
                by_repo.setdefault(job.file.repo_id, []).append(job)
            else:
                _plan_url(job, state)
        for repo_id, repo_jobs in by_repo.items():
            _plan_repo(repo_id, repo_jobs, state)
        todo = [j for j in jobs if j.status == "download"]
        if todo:
            total = sum(j.size if j.size is not None else int(j.file.size_mb * 1e6) for j in todo)
            resumed = sum(p.stat().st_size for j in todo if isinstance(j.file, UrlFile) and (p := _part(j)).is_file())
            note = f" ({human_size(resumed)} already there from an interrupted run)" if resumed else ""
            progress.log(f"downloading {len(todo)} file(s), {human_size(total)}{note}")
            with progress.task("download MB", total=max(1, round(total / 1e6))) as advance:
                def on_bytes(n: int, on_disk: bool = False) -> None:
                    moved["bar"] += n
                    if not on_disk:
                        moved["net"] += max(n, 0)
                        moved["job"] += max(n, 0)
                    mb = int(moved["bar"] / 1e6)
                    if mb != moved["shown"]:
                        advance(mb - moved["shown"], file=moved.get("file", ""))
                        moved["shown"] = mb

                for job in todo:
                    moved["file"], moved["job"] = job.filename or job.file.filename, 0
                    if isinstance(job.file, UrlFile) and _part(job).is_file():
                        on_bytes(_part(job).stat().st_size, on_disk=True)
                    try:
                        (_download_hub if isinstance(job.file, HubFile) else _download_url)(job, on_bytes)
                        # a blob already in the cache under another commit is linked, not fetched again
                        job.status = "downloaded" if moved["job"] or not job.size else "cached"
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
    parts = [f"{', '.join(labels)} ({why})" for why, labels in by_reason.items()]
    hint = "; rerun with network access (files already fetched are kept)" \
        if any(r.startswith(("offline", "cannot reach")) for r in by_reason) else ""
    return f"could not get {len(failed)} file(s): " + "; ".join(parts) + hint
