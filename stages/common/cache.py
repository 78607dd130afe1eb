"""vd's own cache folder (weights that are not in the Hugging Face cache, file digests)."""

from __future__ import annotations

import os
from pathlib import Path


def vd_cache(folder: str = "") -> Path:
    """<$XDG_CACHE_HOME or ~/.cache>/vd/<folder> (read at call time)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "vd" / folder if folder else base / "vd"
