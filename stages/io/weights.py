"""Reading weight files safely: safetensors, or a pickle with torch.load(weights_only=True) (no code runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.common.errors import InputError
from stages.common.errors import first_line


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The tensors of one checkpoint file; a top-level "state_dict" wrapper is unwrapped.

    Unreadable files, and pickles that would need arbitrary code, raise InputError (one line).
    """
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = first_line(exc)
        raise InputError(f"cannot read weights {path}: {reason}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise InputError(f"{path} does not hold a state dict")
    return data
