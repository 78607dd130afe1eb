"""The page's named objects: a JSON list of {name, phrase, points [[x, y, label]], box [x0, y0, x1, y1],
text} in output pixels of the prompt frame (the `/track` endpoint's `objects`). Clicks edit it; it becomes
the `objects` (or, box-only, the single-object `box`) options of stages.mask's MaskConfig, and the same
`vd mask` flags for the command line shown on the page."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from stages.common.errors import UsageError
from stages.mask.objects import check_object_name
from stages.mask.prompts import parse_box, parse_point

DEFAULT = "object"
LABELS = {"object point": 1, "background point": 0}
BOX_MODE = "box corners"


def blank(name: str = DEFAULT, phrase: str | None = None) -> dict[str, Any]:
    """An object without prompts."""
    return {"name": name, "phrase": phrase, "points": [], "box": None, "text": None}


def _num(value: float) -> float | int:
    value = float(value)
    return int(value) if value.is_integer() else round(value, 2)


def parse_objects(value: str | list[Any] | None) -> list[dict[str, Any]]:
    """The objects from JSON text (or an already parsed list), normalised; UsageError when malformed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UsageError(f"objects: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise UsageError("objects: expected a JSON list of {name, phrase, points, box, text}")
    out: list[dict[str, Any]] = []
    for k, entry in enumerate(value):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise UsageError(f"objects[{k}]: each object needs a name")
        unknown = sorted(set(entry) - {"name", "phrase", "points", "box", "text"})
        if unknown:
            raise UsageError(f"objects[{k}]: unknown key {unknown[0]!r} (name, phrase, points, box, text)")
        name = check_object_name(str(entry["name"]).strip())
        points = []
        for p in entry.get("points") or []:
            x, y, label = parse_point(",".join(str(v) for v in p) if isinstance(p, (list, tuple)) else str(p))
            points.append([_num(x), _num(y), label])
        box = entry.get("box")
        if box is not None:
            box = [_num(v) for v in parse_box(",".join(str(v) for v in box) if isinstance(box, (list, tuple))
                                              else str(box))]
        phrase = " ".join(str(entry.get("phrase") or "").split()) or None
        text = " ".join(str(entry.get("text") or "").split()) or None
        out.append({"name": name, "phrase": phrase, "points": points, "box": box, "text": text})
    names = [o["name"] for o in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"objects: two objects are named {dup[0]!r}")
    return out


def dump_objects(objects: list[dict[str, Any]]) -> str:
    """The objects as JSON text, one object per line."""
    return "[\n" + ",\n".join("  " + json.dumps(o) for o in objects) + "\n]"


def _find(objects: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    for entry in objects:
        if entry["name"] == name:
            return entry
    if name:
        raise UsageError(f"no object named {name!r}; add it first")
    raise UsageError("no object selected; add an object first")


def add_object(objects: list[dict[str, Any]], name: str, phrase: str | None = None) -> list[dict[str, Any]]:
    """A new named object (with its source phrase: its words in the video's prompt)."""
    name = check_object_name(str(name).strip())
    if any(o["name"] == name for o in objects):
        raise UsageError(f"an object named {name!r} exists already")
    return [*objects, blank(name, " ".join((phrase or "").split()) or None)]


def remove_object(objects: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Every object but `name`."""
    _find(objects, name)
    return [o for o in objects if o["name"] != name]


def click(objects: list[dict[str, Any]], name: str, x: float, y: float, mode: str,
          corner: list[float] | None = None) -> tuple[list[dict[str, Any]], list[float] | None, str]:
    """Apply one click on the frame: add a point (object or background) to object `name`, or in box mode take
    the first corner, then (second click) set the box. Returns (objects, pending corner, what happened)."""
    target = _find(objects, name)
    x, y = _num(x), _num(y)
    if mode == BOX_MODE:
        if corner is None:
            return objects, [x, y], f"box corner {x},{y} for {name}: click the opposite corner"
        x0, x1 = sorted((corner[0], x))
        y0, y1 = sorted((corner[1], y))
        if x1 - x0 < 1 or y1 - y0 < 1:
            return objects, None, "the two corners make an empty box; click two opposite corners"
        target["box"] = [x0, y0, x1 + 1, y1 + 1]  # the clicked pixels are inside the box
        return objects, None, f"box {x0},{y0},{x1 + 1},{y1 + 1} for {name}"
    if mode not in LABELS:
        raise UsageError(f"unknown click mode {mode!r}")
    target["points"].append([x, y, LABELS[mode]])
    return objects, None, f"{mode} {x},{y} for {name}"


def undo_point(objects: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Remove the last point of `name`."""
    target = _find(objects, name)
    if target["points"]:
        target["points"].pop()
    return objects


def set_field(objects: list[dict[str, Any]], name: str, key: str, value: str | None) -> list[dict[str, Any]]:
    """Set or clear (empty value) an object's box ('X0,Y0,X1,Y1'), text or phrase."""
    target = _find(objects, name)
    text = " ".join(str(value or "").split())
    if key == "box":
        target["box"] = [_num(v) for v in parse_box(text)] if text else None
    elif key in ("text", "phrase"):
        target[key] = text or None
    else:
        raise UsageError(f"unknown object field {key!r}")
    return objects


def clear(objects: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Drop the points and box of `name`."""
    target = _find(objects, name)
    target["points"], target["box"] = [], None
    return objects


def from_workspace(described: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The page's objects from a workspace's masks attrs `objects` (what `vd mask` stored)."""
    objects = []
    for entry in described or []:
        try:
            objects.append(parse_objects([{k: entry.get(k) for k in ("name", "phrase", "points", "box", "text")}])[0])
        except UsageError:
            continue  # an entry this page cannot show: start that object afresh
    return objects or [blank()]


def _point(p: list[Any]) -> str:
    return f"{_num(p[0])},{_num(p[1])},{int(p[2])}"


def _box(b: list[Any]) -> str:
    return ",".join(str(_num(v)) for v in b)


def mask_options(objects: list[dict[str, Any]], box_only: bool) -> tuple[dict[str, Any], list[str], str]:
    """(MaskConfig fields, the same as `vd mask` flags, a note) for these objects. Box only uses each object's
    box alone on every frame (`vd mask --box-only`; its points and text are not used: the note says so)."""
    if not objects:
        raise UsageError("no objects: add one and click its points or give its box")
    entries, flags, unused = [], ["--box-only"] if box_only else [], []
    for o in objects:
        if box_only and o["box"] is None:
            raise UsageError(f"box only needs a box for every object; {o['name']!r} has none: type X0,Y0,X1,Y1 "
                             f"or click two corners (or untick box only to track its points with SAM2)")
        if not (o["points"] or o["box"] or o["text"]):
            raise UsageError(f"object {o['name']!r} has no points, box or text: click on it, type its box or "
                             f"its phrase for the detector, or remove it")
        if box_only and (o["points"] or o["text"]):
            unused.append(o["name"])
        points = [] if box_only else [_point(p) for p in o["points"]]
        entry = {"name": o["name"], "phrase": o["phrase"], "points": points,
                 "box": _box(o["box"]) if o["box"] else None, "text": None if box_only else o["text"]}
        entries.append(entry)
        flags += ["--object", o["name"] + (f"={o['phrase']}" if o["phrase"] else "")]
        for p in entry["points"]:
            flags += ["--point", p]
        if entry["box"]:
            flags += ["--box", entry["box"]]
        if entry["text"]:
            flags += ["--text", entry["text"]]
    note = f"box only: the points and phrase searches of {', '.join(map(repr, unused))} are not used" if unused else ""
    return {"objects": entries, "box_only": bool(box_only)}, flags, note


def prompts_of(objects: list[dict[str, Any]]) -> list[tuple[list[list[float]], list[float] | None]]:
    """(points, box) per object, in object order: what stages.mask.preview.draw_prompts draws."""
    return [(o["points"], o["box"]) for o in objects]


def draw(frame: np.ndarray, objects: list[dict[str, Any]], corner: list[float] | None = None) -> np.ndarray:
    """The frame with every object's points and box in its colour (the preview's own drawing), and a pending
    box corner as a small cross."""
    from stages.mask.preview import draw_prompts

    out = draw_prompts(frame[None], prompts_of(objects), 0)[0]
    if corner is not None:
        x, y = int(round(corner[0])), int(round(corner[1]))
        h, w = out.shape[:2]
        arm = max(2, min(h, w) // 40)
        out[max(0, y - arm):y + arm + 1, min(max(x, 0), w - 1)] = 255
        out[min(max(y, 0), h - 1), max(0, x - arm):x + arm + 1] = 255
    return out


def zoom(height: int, width: int, target: int = 384) -> int:
    """The whole-number factor that shows a small frame at about `target` px (Gradio never scales an image
    up, and a whole factor maps a click back to the exact frame pixel)."""
    return max(1, int(target) // max(int(height), int(width), 1))


def enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by a whole factor."""
    return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
