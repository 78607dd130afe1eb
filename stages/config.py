"""Stage configuration: typed dataclasses filled from a preset (YAML) and then from CLI flags."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stages.errors import InputError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
T = TypeVar("T")


def preset_names() -> list[str]:
    """Names of the presets shipped in presets/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | None) -> dict[str, Any]:
    """Load a preset by name (presets/NAME.yaml) or from a YAML file path; {} for None."""
    if not name_or_path:
        return {}
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise InputError(f"unknown preset {name_or_path!r}; available: {', '.join(preset_names())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"preset {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"preset {path} must be a mapping of settings")
    return data


STAGE_SECTIONS = ("mask", "invert", "edit", "eval")


def preset_section(name_or_path: str | None, section: str) -> dict[str, Any]:
    """The `section:` part of a preset (e.g. "invert"); a preset with no stage sections is taken whole."""
    data = load_preset(name_or_path)
    if not any(key in data for key in STAGE_SECTIONS):
        return data
    part = data.get(section) or {}
    if not isinstance(part, dict):
        raise InputError(f"preset {name_or_path}: the `{section}:` section must be a mapping of settings")
    return dict(part)


def build_config(cls: type[T], *layers: dict[str, Any] | None) -> T:
    """Build dataclass `cls` from layered dicts (later wins; None values are skipped).

    Unknown keys are refused with a message naming them.
    """
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            key = key.replace("-", "_")
            if key not in fields:
                raise InputError(f"unknown setting {key!r} for {cls.__name__}; known: {', '.join(sorted(fields))}")
            if value is not None:
                merged[key] = value
    return cls(**merged)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(values: dict[str, Any]) -> str:
    """Stable short hash of settings (used to refuse resuming with changed settings)."""
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of settings whose values differ between two config dicts."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
