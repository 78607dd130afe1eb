"""Short, stable content digests of arrays and JSON-able values (settings, masks, frames)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def digest(*parts: Any, length: int = 16) -> str:
    """sha256 over the parts (arrays by their bytes, other values as sorted JSON), first `length` hex digits."""
    h = hashlib.sha256()
    for part in parts:
        h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray)
                 else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:length]
