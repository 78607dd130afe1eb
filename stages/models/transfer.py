"""A small resumable HTTP downloader for the weights that are not on the Hugging Face Hub (LPIPS), and the
content checks every downloaded file goes through (size, sha256 or git blob sha1).

Bytes go to a partial file that the next attempt, in this run or a later one, continues with an HTTP Range
request; the caller renames it into place once verified. $VD_DOWNLOAD_MIRROR redirects these URLs.
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
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from stages.common.errors import first_line
from stages.models.catalog import ENV_MIRROR

CHUNK = 1 << 20
RETRIES = 5


class Unreachable(Exception):
    """The server could not be contacted at all (offline, DNS, refused): no point trying other files."""


class TransferError(Exception):
    """A file could not be downloaded or verified; the message is one line."""


def reason(exc: BaseException) -> str:
    """A short one-line description of an exception (its `reason` when it has one)."""
    return first_line(getattr(exc, "reason", None) or exc)[:120]


def mirrored(url: str) -> str:
    """`url` rewritten onto $VD_DOWNLOAD_MIRROR (https://a.b/c -> {mirror}/a.b/c) when that is set."""
    mirror = os.environ.get(ENV_MIRROR, "").rstrip("/")
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


def open_url(url: str, headers: dict[str, str], method: str = "GET") -> Any:
    """urlopen with identity encoding (sizes stay true), a 30 s timeout and certifi's CA bundle."""
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
            with open_url(url, req_headers) as resp:
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
                raise Unreachable(f"{urlsplit(url).netloc}: {reason(exc)}") from None
            failures = 0 if received else failures + 1
        if failures > RETRIES:
            raise TransferError(f"download kept failing (partial file kept: {part})")
        time.sleep(sleep * max(failures, 1))


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one pass."""
    sha, git = hashlib.sha256(), hashlib.sha1()
    git.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK * 8):
            sha.update(chunk)
            git.update(chunk)
    return sha.hexdigest(), git.hexdigest()


def verify(path: Path, size: int | None, sha256: str | None = None, git_sha1: str | None = None) -> tuple[str, str]:
    """Check the size, then the sha256 (a full digest, or the published prefix of one) or the git blob sha1.

    Returns (the file's sha256, what was checked: sha256 | sha256-prefix | git-sha1 | size | none); raises
    TransferError on a mismatch.
    """
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise TransferError(f"size {actual} bytes, expected {size}")
    digest, git = file_hashes(path)
    if sha256:
        if not digest.startswith(sha256.lower()):
            raise TransferError(f"sha256 {digest[:12]}... does not match the published {sha256[:12]}...")
        return digest, "sha256" if len(sha256) == 64 else "sha256-prefix"
    if git_sha1:
        if git != git_sha1.lower():
            raise TransferError(f"git sha1 {git[:12]}... does not match {git_sha1[:12]}...")
        return digest, "git-sha1"
    return digest, "size" if size is not None else "none"
