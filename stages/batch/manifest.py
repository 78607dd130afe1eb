"""Batch manifests for `vd batch`: YAML (or JSONL) read with yaml.safe_load and validated as a whole.

A manifest has `defaults` (applied to every clip) and `clips` (one entry per clip). Keys are the flags of
`vd mask` and `vd invert` with underscores (frames, size, box, box_only, prompt, subject, model, ...), plus
`clip`, `name`, `edits`, `preset`, `device`, `objects` (named objects: [{name, phrase, points, box, text}])
and the stage sections `mask:`, `invert:`, `edit:`, `eval:` (the stages' settings, as in presets), and
`export:` (`vd export`'s options for every edit of the clip: true, false, or a mapping of codec, crf, audio,
whole_clip, feather, color_match). An edit is a prompt, or a mapping with `prompt:` or `regions:` ({object
name: target phrase}, as `vd edit --region`).
Per-clip keys override `defaults`; sections are merged key by key.
Settings are built with stages.common.config.build_config (type checks) and checked with the stages' own rules,
so a bad entry fails here, naming its index and key, before any clip runs. A missing clip file is not a
manifest error: it fails that clip alone at run time.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common.config import Layer, build_config, preset_section
from stages.common.errors import InputError, VdError
from stages.io.storage import is_url
from stages.common.errors import first_line

MASK_FLAGS = ("frames", "size", "start", "stride", "fps", "sample", "resize", "point", "points", "box",
              "prompt_frame", "sam2", "mask_dir", "mask_video", "box_only", "no_ellipse", "objects")
INVERT_FLAGS = ("prompt", "subject", "negative_prompt", "model", "steps", "cfg", "null_steps", "stdg", "region",
                "no_stdg", "shared_null", "schedule", "seed", "per_frame_groupnorm", "store_components", "plain",
                "compare_ddim", "dtype", "method")
SECTIONS = ("mask", "invert", "edit", "eval")
OTHER_KEYS = ("clip", "name", "edits", "preset", "device", "export")
EXPORT_KEYS = ("codec", "crf", "audio", "whole_clip", "feather", "color_match")  # the rest is the batch's
CLIP_KEYS = frozenset(MASK_FLAGS + INVERT_FLAGS + SECTIONS + OTHER_KEYS)
# what the batch itself decides (resume/redo) or where it writes; never taken from a manifest
BATCH_OWNED = {"mask": ("force",), "invert": ("restart",), "edit": ("force", "output"), "eval": ("edits", "store")}


@dataclass
class ClipPlan:
    """One clip of a batch: where it comes from and every stage's settings (picklable for Ray)."""

    index: int
    name: str
    clip: str  # absolute local path or URL
    mask: Any  # stages.mask.run.MaskConfig
    invert: Any  # stages.invert.InvertConfig
    edits: list[Any] = field(default_factory=list)  # stages.edit.run.EditConfig, one per edit
    eval: Any = None  # stages.evaluate.EvalConfig
    edit_names: list[str] = field(default_factory=list)
    export: Any = None  # stages.export.ExportConfig for every edit (edit and output set per edit), or None


@dataclass
class Manifest:
    """A validated manifest."""

    path: Path
    clips: list[ClipPlan]


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the whole manifest; InputError (one line: file, clip index, key) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from None
    data = _parse_jsonl(path, text) if path.suffix.lower() == ".jsonl" else _parse_yaml(path, text)
    return validate_manifest(data, path)


def _parse_yaml(path: Path, text: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"manifest {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise InputError(f"manifest {path} must be a mapping with `clips:` (and optional `defaults:`)")
    return data


def _parse_jsonl(path: Path, text: str) -> dict[str, Any]:
    """One JSON object per line: clip entries; a line {"defaults": {...}} sets the defaults."""
    defaults: dict[str, Any] = {}
    clips: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"manifest {path}, line {number}: not valid JSON ({exc.msg})") from None
        if isinstance(item, dict) and set(item) == {"defaults"}:
            defaults = item["defaults"]
        else:
            clips.append(item)
    return {"defaults": defaults, "clips": clips}


def validate_manifest(data: dict[str, Any], path: Path) -> Manifest:
    """Validate parsed manifest data; relative clip and mask paths are taken from the manifest's folder."""
    unknown = sorted(set(data) - {"defaults", "clips"})
    if unknown:
        raise InputError(f"manifest {path}: unknown top-level key {unknown[0]!r}; use `defaults:` and `clips:`")
    defaults = data.get("defaults") or {}
    clips = data.get("clips")
    if not isinstance(defaults, dict):
        raise InputError(f"manifest {path}: `defaults:` must be a mapping of settings")
    if not isinstance(clips, list) or not clips:
        raise InputError(f"manifest {path}: `clips:` must be a non-empty list of clip entries")
    _check_keys(defaults, f"manifest {path}: defaults")
    if "clip" in defaults or "name" in defaults:
        raise InputError(f"manifest {path}: defaults: `clip` and `name` belong to each clip entry")
    plans = []
    for index, entry in enumerate(clips):
        where = f"manifest {path}: clips[{index}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: must be a mapping with at least `clip:` and `prompt:`")
        _check_keys(entry, where)
        plans.append(_plan(index, defaults, entry, path.parent, f"manifest {path}"))
    _name_workspaces(plans, clips, f"manifest {path}")
    return Manifest(path, plans)


def _check_keys(entry: dict[str, Any], where: str) -> None:
    for key in entry:
        if not isinstance(key, str) or key not in CLIP_KEYS:
            close = difflib.get_close_matches(str(key), sorted(CLIP_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{where}: unknown key {key!r}{hint}")
    for section in SECTIONS:
        value = entry.get(section)
        if value is not None and not isinstance(value, dict):
            raise InputError(f"{where}: `{section}:` must be a mapping of {section} settings")
        for key in BATCH_OWNED[section]:
            if isinstance(value, dict) and key in value:
                raise InputError(f"{where}: {section}.{key} is not a manifest setting (vd batch decides what to redo)")


def _plan(index: int, defaults: dict[str, Any], entry: dict[str, Any], base: Path, label: str) -> ClipPlan:
    from stages.edit.run import EditConfig
    from stages.evaluate import EvalConfig, parse_metrics
    from stages.invert import InvertConfig
    from stages.mask.run import MaskConfig

    where_d, where_c = f"{label}: defaults", f"{label}: clips[{index}]"
    clip = entry.get("clip")
    if not isinstance(clip, str) or not clip.strip():
        raise InputError(f"{where_c}: missing `clip:` (a video path relative to the manifest, or a URL)")
    clip = clip if is_url(clip) else str((base / clip).resolve())
    preset = entry.get("preset", defaults.get("preset"))

    def section(name: str) -> list[Layer]:
        layers = [preset_section(preset, name)] if preset else []
        return layers + [Layer(defaults.get(name) or {}, f"{where_d}, {name}"),
                         Layer(entry.get(name) or {}, f"{where_c}, {name}")]

    def flags(keys: tuple[str, ...], convert: Any) -> list[Layer]:
        return [Layer(convert({k: v for k, v in src.items() if k in keys}, where, base), where)
                for src, where in ((defaults, where_d), (entry, where_c))]

    device = entry.get("device", defaults.get("device"))
    dev = [Layer({"device": device}, where_c)] if device is not None else []
    mask = build_config(MaskConfig, *section("mask"), *flags(MASK_FLAGS, _mask_flags), *dev)
    invert = build_config(InvertConfig, *section("invert"), *flags(INVERT_FLAGS, _invert_flags), *dev)
    if mask.mask_dir and not is_url(mask.mask_dir):
        mask.mask_dir = str((base / mask.mask_dir).resolve())
    if mask.mask_video and not is_url(mask.mask_video):
        mask.mask_video = str((base / mask.mask_video).resolve())
    if not (invert.prompt or "").strip():
        raise InputError(f"{where_c}: missing `prompt:` (describe the source video)")
    if invert.subject and not mask.objects and mask.subject is None:
        mask.subject = invert.subject  # as `vd mask --subject`: the one object is named after it
    specs = _check_mask(mask, where_c)
    _stage_check("stages.invert", "validate", invert, where_c)

    edits_raw = entry.get("edits", defaults.get("edits")) or []
    if not isinstance(edits_raw, list):
        raise InputError(f"{where_c}: `edits:` must be a list of prompts or {{prompt or regions, name, ...}} "
                         "mappings")
    edits, names = [], []
    for k, item in enumerate(edits_raw):
        at = f"{where_c}, edits[{k}]"
        if isinstance(item, str):
            item = {"prompt": item}
        if isinstance(item, dict) and "regions" in item:
            _check_regions_item(item, at)
            item = {**item, "prompt": ""}
        if isinstance(item, dict) and item.get("first_frame") and "prompt" not in item:
            item = {**item, "prompt": ""}  # a first-frame edit without a prompt keeps the source prompt
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not (
                item["prompt"].strip() or item.get("first_frame") or item.get("regions")):
            raise InputError(f"{at}: an edit is a prompt text or a mapping with `prompt:` or `regions:` "
                             "(and optional `name:`)")
        owned = [key for key in BATCH_OWNED["edit"] + ("device", "dtype") if key in item]
        if owned:
            raise InputError(f"{at}: {owned[0]!r} is not a per-edit manifest setting")
        cfg = build_config(EditConfig, *section("edit"), Layer(item, at), *dev)
        if cfg.first_frame:  # relative to the manifest, like clip paths
            cfg.first_frame = str((base / cfg.first_frame).resolve())
        if invert.dtype != "auto":
            cfg.dtype = invert.dtype
        _stage_check("stages.edit.run", "validate_edit", cfg, at)
        name = _edit_name(cfg, invert, at, _region_target(cfg, invert, specs, at) if cfg.regions else None)
        if name in names:
            raise InputError(f"{at}: duplicate edit name {name!r} for this clip; give each edit its own `name:`")
        edits.append(cfg)
        names.append(name)
    ev = build_config(EvalConfig, *section("eval"), *dev)
    try:
        ev.metrics = parse_metrics(ev.metrics)
    except VdError as exc:
        raise InputError(f"{where_c}, eval: {exc}") from None
    export = _export_config(defaults.get("export"), entry.get("export"), where_d, where_c, mask)
    return ClipPlan(index, str(entry.get("name") or ""), clip, mask, invert, edits, ev, names, export)


def _export_config(default: Any, own: Any, where_d: str, where_c: str, mask: Any) -> Any:
    """The clip's export settings: `export:` true (vd export's defaults), false / absent (no export) or a
    mapping of EXPORT_KEYS; the clip's mapping overrides the defaults' key by key, its false turns them off."""
    from stages.export import ExportConfig, validate

    layers = []
    for value, where in ((default, f"{where_d}, export"), (own, f"{where_c}, export")):
        if value is None:
            continue
        if isinstance(value, bool):
            layers = [Layer({}, where)] if value else []
            continue
        if not isinstance(value, dict):
            raise InputError(f"{where}: must be true, false or a mapping of {', '.join(EXPORT_KEYS)}")
        bad = [k for k in value if k not in EXPORT_KEYS]
        if bad:
            owned = bad[0] in ("edit", "output", "source", "force")
            why = ("is not a manifest setting (vd batch exports every edit to WS/edits/NAME/export.*)" if owned
                   else f"is not an export setting; use {', '.join(EXPORT_KEYS)}")
            raise InputError(f"{where}: {bad[0]!r} {why}")
        value = dict(value)
        if isinstance(value.get("color_match"), str) and value["color_match"] in ("on", "off"):
            value["color_match"] = value["color_match"] == "on"  # as `vd export --color-match on|off`
        layers.append(Layer(value, where))
    if not layers:
        return None
    cfg = build_config(ExportConfig, *layers)
    _stage_check("stages.export", "validate", cfg, f"{where_c}, export")
    if cfg.whole_clip and ((mask.stride or 1) != 1 or mask.fps):
        raise InputError(f"{where_c}, export: whole_clip needs consecutive frames; this clip samples with "
                         f"{'fps' if mask.fps else 'stride'} (drop whole_clip to export the sampled frames)")
    return cfg


def _mask_flags(values: dict[str, Any], where: str, base: Path) -> dict[str, Any]:
    """Manifest mask keys -> MaskConfig fields (box as a list or "X0,Y0,X1,Y1", points as lists or text)."""
    out = dict(values)
    if "box" in out and isinstance(out["box"], (list, tuple)):
        out["box"] = ",".join(_number(v, f"{where}: box") for v in out["box"])
    points = list(out.pop("point", None) or []) + list(out.pop("points", None) or [])
    if points:
        out["points"] = [",".join(_number(v, f"{where}: points") for v in p) if isinstance(p, (list, tuple))
                         else p for p in points]
    if "no_ellipse" in out:
        flag = out.pop("no_ellipse")
        if not isinstance(flag, bool):
            raise InputError(f"{where}: no_ellipse must be true or false, got {flag!r}")
        out["ellipse"] = not flag
    return out


def _invert_flags(values: dict[str, Any], where: str, base: Path) -> dict[str, Any]:
    """Manifest invert keys -> InvertConfig fields (no_stdg -> use_stdg, "a,b,c,d" -> stdg list)."""
    out = dict(values)
    if "no_stdg" in out:
        flag = out.pop("no_stdg")
        if not isinstance(flag, bool):
            raise InputError(f"{where}: no_stdg must be true or false, got {flag!r}")
        out["use_stdg"] = not flag
    if isinstance(out.get("stdg"), str):
        out["stdg"] = [p.strip() for p in out["stdg"].split(",")]
        try:
            out["stdg"] = [float(p) for p in out["stdg"]]
        except ValueError:
            raise InputError(f"{where}: stdg must be four numbers ETA_F,ETA_B,ZETA_F,ZETA_B") from None
    return out


def _number(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where} must hold numbers, got {value!r}")
    return f"{value:g}"


def _stage_check(module: str, fn: str, cfg: Any, where: str) -> None:
    """Run a stage's own option checks; their flag-style messages get the manifest location."""
    import importlib

    try:
        getattr(importlib.import_module(module), fn)(cfg)
    except VdError as exc:
        raise InputError(f"{where}: {first_line(exc)}") from None


def _check_mask(cfg: Any, where: str) -> list[Any]:
    """The mask stage's checks (every object's prompts inside the frame); returns its ObjectSpecs."""
    from stages.io.video import parse_size
    from stages.mask.objects import check_objects_inside, object_specs
    from stages.mask.run import check_options

    try:
        check_options(cfg)
        height, width = parse_size(cfg.size)
        specs = object_specs(cfg)
        check_objects_inside(specs, height, width)
    except VdError as exc:
        raise InputError(f"{where}: {first_line(exc)}") from None
    return specs


def _check_regions_item(item: dict[str, Any], where: str) -> None:
    """A region edit: `regions:` a non-empty mapping, and no `prompt:` beside it."""
    regions = item["regions"]
    if "prompt" in item:
        raise InputError(f"{where}: give `prompt:` or `regions:`, not both (regions build the target prompt)")
    if not isinstance(regions, dict) or not regions:
        raise InputError(f"{where}: `regions:` must map object names to target phrases, e.g. {{dog: cat}}")


class _PlannedObjects:
    """The objects `vd mask` will write for a clip, shaped as the workspace group stages.edit.regions reads."""

    def __init__(self, specs: list[Any], where: str):
        self.path = where
        self._attrs = {"names": [s.name for s in specs], "phrases": {s.name: s.phrase for s in specs}}

    def group_attrs(self, name: str) -> dict[str, Any]:
        return self._attrs


def _region_target(cfg: Any, invert: Any, specs: list[Any], where: str) -> str:
    """The target prompt of a region edit, checked against the clip's objects and the inversion prompt."""
    from stages.edit.regions import plan_regions

    names = [s.name for s in specs]
    for key, table in (("regions", cfg.regions), ("objects", cfg.objects)):
        for name in table:
            if name not in names:
                raise InputError(f"{where}: {key}: unknown object {name!r}; this clip's objects are "
                                 f"{', '.join(names)}")
    try:
        return plan_regions(_PlannedObjects(specs, where), invert.prompt, cfg.regions,  # type: ignore[arg-type]
                            cfg.objects).target
    except VdError as exc:
        raise InputError(f"{where}: regions: {first_line(exc)}") from None


def _edit_name(cfg: Any, invert: Any, where: str, target: str | None = None) -> str:
    """The edit's name as `vd edit` will choose it (explicit, or from the changed words); `target` is a
    region edit's target prompt."""
    from stages.edit.run import RESERVED_NAMES
    from stages.method.prompts import changed_words, resolve_prompt, slug
    from stages.io.workspace import check_name

    try:
        if target is None and cfg.first_frame and not cfg.prompt.strip():  # as stages.edit.run.plan_edit
            target = invert.prompt
        elif target is None:
            target, _mode = resolve_prompt(cfg.prompt, invert.prompt, invert.subject)
        name = check_name(cfg.name or slug(changed_words(invert.prompt, target) or list(cfg.reweight),
                                           default="first-frame" if cfg.first_frame else "edit"))
    except VdError as exc:
        raise InputError(f"{where}: {first_line(exc)}") from None
    if "/" in name or name in RESERVED_NAMES:
        raise InputError(f"{where}: edit name {name!r} is not allowed (no '/'; reserved: "
                         f"{', '.join(sorted(RESERVED_NAMES))})")
    return name


def _name_workspaces(plans: list[ClipPlan], entries: list[dict[str, Any]], label: str) -> None:
    """Explicit names must be unique; default names (the clip's stem) are deduplicated with -2, -3, ..."""
    from stages.io.workspace import check_name

    taken: dict[str, int] = {}
    for plan in plans:
        if plan.name:
            where = f"{label}: clips[{plan.index}]"
            try:
                check_name(plan.name)
            except VdError as exc:
                raise InputError(f"{where}: name: {exc}") from None
            if "/" in plan.name:
                raise InputError(f"{where}: name {plan.name!r} must not contain '/'")
            if plan.name in taken:
                raise InputError(f"{where}: duplicate name {plan.name!r} (also clips[{taken[plan.name]}])")
            taken[plan.name] = plan.index
    for plan in plans:
        if plan.name:
            continue
        stem = _stem(plan.clip)
        name, n = stem, 2
        while name in taken:
            name, n = f"{stem}-{n}", n + 1
        plan.name = name
        taken[name] = plan.index


def _stem(clip: str) -> str:
    import re

    last = clip.rstrip("/").rsplit("/", 1)[-1]
    stem = last.rsplit(".", 1)[0] if "." in last else last
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", stem).strip("-.") or "clip"


def plan_dict(plan: ClipPlan) -> dict[str, Any]:
    """JSON-friendly view of a plan (for reports)."""
    from stages.common.config import config_dict

    return {"index": plan.index, "name": plan.name, "clip": plan.clip, "mask": config_dict(plan.mask),
            "invert": config_dict(plan.invert), "edits": [config_dict(e) for e in plan.edits],
            "edit_names": plan.edit_names, "eval": dataclasses.asdict(plan.eval) if plan.eval else None,
            "export": config_dict(plan.export) if plan.export else None}
