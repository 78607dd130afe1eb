"""Serving the page: the security rules, checked before Gradio is imported, then the launch.

- 127.0.0.1 by default; any other host needs --auth USER:PASS (or $VD_UI_AUTH), else one line and exit 2.
- No share link, ever. Files are served only from ROOT (allowed_paths) and Gradio's own temporary folder.
- Uploads are size-limited (Gradio's max_file_size, and again when a clip is kept under ROOT/uploads/).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from stages.common.errors import UsageError, first_line

AUTH_ENV = "VD_UI_AUTH"
LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServeOptions:
    """What `vd ui` was given."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None
    model: str | None = None
    device: str = "auto"
    sam2: str = "auto"
    max_upload: int = 500 * 2**20


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host.strip().lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'USER:PASS' -> (user, pass); None stays None; a malformed value -> UsageError."""
    if text is None or not str(text).strip():
        return None
    user, sep, password = str(text).partition(":")
    if not sep or not user.strip() or not password:
        raise UsageError("--auth must be USER:PASS (both non-empty)")
    return user.strip(), password


def check(options: ServeOptions) -> tuple[str, str] | None:
    """The credentials to require (None: none), refusing an exposed page without them."""
    auth = parse_auth(options.auth if options.auth is not None else os.environ.get(AUTH_ENV))
    if auth is None and not is_loopback(options.host):
        raise UsageError(f"--host {options.host} exposes the page beyond this machine: give --auth USER:PASS "
                         f"(or set {AUTH_ENV}), or keep the default --host 127.0.0.1")
    if not 1 <= int(options.port) <= 65535:
        raise UsageError(f"--port must be in 1..65535 (got {options.port})")
    return auth


def serve(options: ServeOptions, block: bool = True) -> tuple[object, str]:
    """Build and launch the page; returns (the Gradio Blocks, its local URL). With `block` it serves until
    Ctrl-C."""
    auth = check(options)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    from vdcli.ui.actions import Studio
    from vdcli.ui.page import CSS, build

    studio = Studio(options.root, options.model, options.device, options.sam2)
    page = build(studio, options.max_upload)
    page.queue(default_concurrency_limit=None)  # long jobs refuse each other at once (vdcli.ui.jobs)
    try:
        _, url, _ = page.launch(server_name=options.host, server_port=int(options.port), auth=auth, share=False,
                                allowed_paths=[str(studio.root.path)], max_file_size=options.max_upload,
                                prevent_thread_lock=True, quiet=True, ssr_mode=False, show_error=False,
                                inbrowser=False, css=CSS)
    except OSError as exc:  # Gradio's "Cannot find empty port", an address not on this machine
        raise UsageError(f"cannot listen on {options.host}:{options.port} ({first_line(exc)}); choose another "
                         f"--port or --host") from None
    if block:
        print(f"vd ui: serving {studio.root.path} on {url} (Ctrl-C stops)", file=sys.stderr, flush=True)
        page.block_thread()  # until Ctrl-C; Gradio closes the server
    return page, url
