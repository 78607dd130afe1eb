"""Strict-JSON conversion shared by workspace attributes, `--json` output and eval results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """Make a value strict-JSON safe, recursively: numpy -> Python, Path -> str, nan -> None,
    +-inf -> "inf"/"-inf" (the convention of stored attributes, `--json` output and `vd eval`)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
