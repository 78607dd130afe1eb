"""Stage configuration: typed dataclasses filled from a preset (YAML) and then from CLI flags."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from stages.common.errors import InputError, UsageError, first_line
from stages.common.digest import digest

PRESET_DIR = Path(importlib.resources.files("presets"))  # the shipped presets/ package (YAML files)
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
        raise InputError(f"preset {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise InputError(f"preset {path} must be a mapping of settings")
    return data


STAGE_SECTIONS = ("mask", "invert", "edit", "eval")


class Layer(dict):  # type: ignore[type-arg]
    """A dict of settings that knows where it came from, for error messages.

    source: e.g. "preset presets/x.yaml, section invert"; options=True: command-line flags (errors
    name `--the-flag` and are usage errors, exit 2) instead of file settings (input errors, exit 3).
    """

    def __init__(self, values: dict[str, Any] | None = None, source: str = "", options: bool = False):
        super().__init__(values or {})
        self.source = source
        self.options = options


def options(values: dict[str, Any]) -> Layer:
    """Mark `values` as command-line flags for build_config's messages."""
    return Layer(values, "options", options=True)


def preset_section(name_or_path: str | None, section: str) -> Layer:
    """The `section:` part of a preset (e.g. "invert"); a preset with no stage sections is taken whole."""
    data = load_preset(name_or_path)
    if not any(key in data for key in STAGE_SECTIONS):
        return Layer(data, f"preset {name_or_path}")
    part = data.get(section) or {}
    if not isinstance(part, dict):
        raise InputError(f"preset {name_or_path}: the `{section}:` section must be a mapping of settings")
    return Layer(part, f"preset {name_or_path}, section {section}")


def build_config(cls: type[T], *layers: dict[str, Any] | None, source: str | None = None) -> T:
    """Build dataclass `cls` from layered dicts (later wins; None values are skipped).

    Every value is checked against the field's type (str, int, float, bool, lists, dicts, X | None):
    ints must fit int64, floats must be finite, an int-valued float is taken as an int and an int as a
    float. Unknown keys and wrong types raise InputError (UsageError for `options(...)` layers) naming
    the layer's source (a Layer's own, else `source`) and the key.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged: dict[str, Any] = {}
    for layer in layers:
        label = getattr(layer, "source", "") or source or ""
        flags = bool(getattr(layer, "options", False))
        for key, value in (layer or {}).items():
            if not isinstance(key, str) or key.replace("-", "_") not in fields:
                where = f"{label}: " if label else ""
                raise InputError(f"{where}unknown setting {key!r} for {cls.__name__}; "
                                 f"known: {', '.join(sorted(fields))}")
            key = key.replace("-", "_")
            if value is None:
                continue
            shown = "--" + key.replace("_", "-") if flags else key
            try:
                merged[key] = _field_value(fields[key], value, hints.get(key, Any), shown)
            except ValueError as exc:
                where = f"{label}: " if label and not flags else ""
                raise (UsageError if flags else InputError)(f"{where}{exc}") from None
    return cls(**merged)


def check_config(cfg: Any) -> Any:
    """Re-check (and normalise in place) every field of a config dataclass built directly, not through
    build_config: UsageError naming `--the-flag`. Returns `cfg`."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        try:
            value = _field_value(f, getattr(cfg, f.name), hints.get(f.name, Any), "--" + f.name.replace("_", "-"))
            setattr(cfg, f.name, value)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return cfg


def _field_value(f: dataclasses.Field, value: Any, hint: Any, name: str) -> Any:  # type: ignore[type-arg]
    if isinstance(value, str) and f.metadata.get("words"):
        value = value.replace(",", " ").split()  # a word list may be given as "bear tiger"
    return coerce(value, hint, name)


INT64 = (-(2 ** 63), 2 ** 63 - 1)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` checked (and converted where lossless) against type `hint`; ValueError names `name`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(value, option, name)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name} has the wrong type: {value!r}")
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if not INT64[0] <= int(value) <= INT64[1]:
            raise ValueError(f"{name} must fit a 64-bit integer, got {value}")
        return int(value)
    if hint is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return str(value)  # e.g. `size: 512`
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a text, got {value!r}")
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[X, Y, ...]
            if len(value) != len(args):
                raise ValueError(f"{name} must have {len(args)} items, got {value!r}")
            return tuple(coerce(v, t, f"{name}[{k}]") for k, (v, t) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{name}[{k}]") for k, v in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        key_t, val_t = args if len(args) == 2 else (Any, Any)
        return {coerce(k, key_t, f"a key of {name}"): coerce(v, val_t, f"{name}[{k!r}]") for k, v in value.items()}
    return value


def config_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(values: dict[str, Any]) -> str:
    """Stable short hash of settings (used to refuse resuming with changed settings)."""
    return digest(values)


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of settings whose values differ between two config dicts."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
