"""Named objects of `vd mask`: their prompts (points, box or text), validation, and the workspace layout.

Workspace contract (what `vd edit --region` reads):
  masks/objects/<name>/raw   uint8 (F, H, W) 0/1, after overlap resolution (objects are disjoint)
  masks/objects/<name>/edit  uint8 (F, H, W) 0/1, raw OR its ellipse (== raw with --no-ellipse)
  group masks/objects attrs: names (ordered), phrases {name: phrase or null}, overlap_pixels {"a|b": n},
                             coverage {name: mean fraction of the frame covered by raw}
masks/raw and masks/edit are the union of all objects. A single-object run writes one object, named after
--subject (spaces become '_') or "object".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from stages.common.errors import InputError, UsageError
from stages.io.workspace import Workspace, check_name
from stages.mask.prompts import box_mask, check_prompts_inside, parse_box, parse_point

GROUP = "masks/objects"
DEFAULT_NAME = "object"
OBJECT_FLAGS = ("--object", "--point", "--box", "--text")


@dataclass
class ObjectSpec:
    """One object to segment: its name, source phrase and prompts (output pixels of the prompt frame)."""

    name: str
    phrase: str | None = None
    points: list[tuple[float, float, int]] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    text: str | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (for attrs and `vd mask --json`)."""
        return {"name": self.name, "phrase": self.phrase, "points": [list(p) for p in self.points],
                "box": [round(v, 2) for v in self.box] if self.box else None, "text": self.text}


# ------------------------------------------------------------------------------------------ names
def check_object_name(name: str) -> str:
    """A workspace-safe object name (one path part: letters, digits, '_', '-', '.')."""
    if not isinstance(name, str) or "/" in name:
        raise UsageError(f"object name {name!r}: use letters, digits, '_', '-', '.' (no '/')")
    try:
        return check_name(name)
    except InputError:
        raise UsageError(f"object name {name!r}: use letters, digits, '_', '-', '.' (not '.' or '..')") from None


def subject_name(subject: str) -> str:
    """The object name for `--subject "brown bear"`: 'brown_bear'."""
    words = subject.split()
    if not words:
        raise UsageError("--subject needs a word or phrase")
    return check_object_name("_".join(words))


def parse_object_flag(text: str) -> tuple[str, str | None]:
    """'NAME' or 'NAME=PHRASE' -> (name, phrase or None)."""
    name, sep, phrase = str(text).partition("=")
    name = check_object_name(name.strip())
    if sep and not phrase.strip():
        raise UsageError(f"--object {text!r}: the phrase after '=' is empty")
    return name, (" ".join(phrase.split()) if sep else None)


# ------------------------------------------------------------------------------------------ argv order
def group_object_args(tokens: Sequence[str]) -> list[dict[str, Any]]:
    """Group --point/--box/--text under the --object before them, by their order on the command line.

    Returns `MaskConfig.objects` entries ({name, phrase, points, box, text}); [] without --object.
    Both '--flag VALUE' and '--flag=VALUE' are read; scanning stops at '--'.
    """
    found: list[tuple[str, str]] = []
    items = list(tokens)
    k = 0
    while k < len(items):
        token = str(items[k])
        if token == "--":
            break
        flag, eq, value = token.partition("=")
        if flag in OBJECT_FLAGS:
            if eq:
                found.append((flag, value))
            elif k + 1 < len(items):
                found.append((flag, str(items[k + 1])))
                k += 1
        k += 1
    if not any(flag == "--object" for flag, _ in found):
        return []
    objects: list[dict[str, Any]] = []
    for flag, value in found:
        if flag == "--object":
            name, phrase = parse_object_flag(value)
            objects.append({"name": name, "phrase": phrase, "points": [], "box": None, "text": None})
            continue
        if not objects:
            raise UsageError(f"{flag} {value} comes before any --object: with named objects every "
                             f"--point/--box/--text follows the --object it belongs to")
        current = objects[-1]
        if flag == "--point":
            current["points"].append(value)
        elif current[flag[2:]] is not None:
            raise UsageError(f"object {current['name']!r} has two {flag} (one {flag} per object)")
        else:
            current[flag[2:]] = value
    return objects


# ------------------------------------------------------------------------------------------ specs
def _points(value: Any, where: str) -> list[tuple[float, float, int]]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{where}: points must be a list of X,Y[,LABEL]")
    out = []
    for p in value:
        if isinstance(p, (list, tuple)):
            p = ",".join(str(v) for v in p)
        out.append(parse_point(str(p)))
    return out


def _box(value: Any) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return parse_box(str(value))


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.split():
        raise UsageError(f"{where}: --text needs a phrase (e.g. --text \"brown bear\")")
    return " ".join(value.split())


def object_specs(cfg: Any) -> list[ObjectSpec]:
    """The objects of a MaskConfig: its `objects` entries, or the single-object form (--point/--box/--text,
    named after --subject or "object"). Raises UsageError on malformed, duplicate or prompt-less objects."""
    single = bool(cfg.points or cfg.box or cfg.text)
    if cfg.objects:
        if single:
            raise UsageError("--point/--box/--text before any --object cannot be mixed with named objects; "
                             "put each after its --object NAME")
        if cfg.subject:
            raise UsageError("--subject names the one object of the single-object form; with --object give "
                             "NAME=PHRASE instead")
        specs: list[ObjectSpec] = []
        for k, entry in enumerate(cfg.objects):
            if not isinstance(entry, dict) or not entry.get("name"):
                raise UsageError(f"objects[{k}] must be a mapping with a name (and points, box or text)")
            unknown = sorted(set(entry) - {"name", "phrase", "points", "point", "box", "text"})
            if unknown:
                raise UsageError(f"objects[{k}]: unknown key {unknown[0]!r} (name, phrase, points, box, text)")
            name, phrase = parse_object_flag(str(entry["name"]))
            phrase = entry.get("phrase") if entry.get("phrase") is not None else phrase
            if phrase is not None and (not isinstance(phrase, str) or not phrase.split()):
                raise UsageError(f"object {name!r}: the phrase must be a non-empty text")
            where = f"object {name!r}"
            points = _points(entry.get("points"), where) + _points(entry.get("point"), where)
            text = _text(entry.get("text"), where)
            specs.append(ObjectSpec(name, " ".join(phrase.split()) if phrase else text, points,
                                    _box(entry.get("box")), text))
    else:
        name = subject_name(cfg.subject) if cfg.subject else DEFAULT_NAME
        text = _text(cfg.text, "--text")
        phrase = " ".join(cfg.subject.split()) if cfg.subject else text
        specs = [ObjectSpec(name, phrase, _points(list(cfg.points), "--point"), _box(cfg.box) if cfg.box else None,
                            text)]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise UsageError(f"duplicate object name {spec.name!r}: give each --object its own name")
        seen.add(spec.name)
        if cfg.objects and not (spec.points or spec.box or spec.text):
            raise UsageError(f"object {spec.name!r} has no --point, --box or --text")
        if spec.box is not None and spec.text is not None:
            raise UsageError(f"object {spec.name!r}: --text finds the box; give --box or --text, not both")
        if spec.points and all(p[2] == 0 for p in spec.points) and spec.box is None and spec.text is None:
            raise UsageError(f"object {spec.name!r} has only background points (LABEL 0): add an object point")
    return specs


def check_objects_inside(specs: Sequence[ObjectSpec], height: int, width: int) -> None:
    """Every object's points and box inside the output frame (InputError naming the object otherwise)."""
    for spec in specs:
        try:
            check_prompts_inside(spec.points, spec.box, height, width)
        except InputError as exc:
            raise InputError(f"object {spec.name!r}: {exc}" if len(specs) > 1 else str(exc)) from None


# ------------------------------------------------------------------------------------------ --box-only
def check_box_only(specs: Sequence[ObjectSpec], named: bool) -> None:
    """--box-only takes each object's --box as its mask: UsageError for an object without a box, or with
    points or a text (those prompt SAM2 or the detector, which --box-only skips). `named`: --object form."""
    for spec in specs:
        if spec.box is None and not named:
            raise UsageError("--box-only needs --box X0,Y0,X1,Y1")
        if spec.box is None:
            raise UsageError(f"--box-only: object {spec.name!r} has no --box; give it --box X0,Y0,X1,Y1 "
                             f"(--point/--text need SAM2: drop --box-only)")
        if spec.points or spec.text:
            whose = f"object {spec.name!r}'s " if named else ""
            raise UsageError(f"--box-only uses the box alone; drop {whose}--point/--text")


def box_masks(specs: Sequence[ObjectSpec], frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """--box-only masks: each object's rectangle on every frame, made disjoint.

    A pixel inside several boxes goes to the smallest of them (a box drawn inside another marks the thing in
    front, which would otherwise vanish); equal areas: the earlier object. Returns (masks uint8 (N, F, H, W)
    0/1, pairs int64 (N, N) upper triangle: pixels both boxes held before the resolution, over all frames).
    """
    rects = np.stack([box_mask(spec.box, 1, height, width)[0] for spec in specs]).astype(bool)  # type: ignore[arg-type]
    count = len(specs)
    areas = rects.reshape(count, -1).sum(axis=1)
    owner = np.full((height, width), -1, np.int64)
    for k in sorted(range(count), key=lambda j: (areas[j], j), reverse=True):  # the smallest is written last
        owner[rects[k]] = k
    masks = (owner[None] == np.arange(count)[:, None, None]).astype(np.uint8)
    flat = rects.reshape(count, -1).astype(np.int64)
    pairs = np.triu(flat @ flat.T, k=1) * frames
    return np.repeat(masks[:, None], frames, axis=1), pairs.astype(np.int64)


# ------------------------------------------------------------------------------------------ results
def pair_key(a: str, b: str) -> str:
    """The overlap_pixels key of two objects: 'a|b' in the objects' order."""
    return f"{a}|{b}"


def overlap_report(names: Sequence[str], pairs: np.ndarray) -> dict[str, int]:
    """{'a|b': pixels} for every pair of objects (i < j in `names` order), zeros included."""
    return {pair_key(names[i], names[j]): int(pairs[i, j]) for i in range(len(names))
            for j in range(i + 1, len(names))}


def coverage(mask: np.ndarray) -> float:
    """Mean fraction of the frame a (F, H, W) 0/1 mask covers."""
    value = float(np.asarray(mask, np.float64).mean()) if np.asarray(mask).size else 0.0
    return round(value, 5) if math.isfinite(value) else 0.0


def write_objects(ws: Workspace, specs: Sequence[ObjectSpec], raws: np.ndarray, edits: np.ndarray,
                  pairs: np.ndarray) -> dict[str, Any]:
    """Replace masks/objects with these objects' raw/edit masks and the group attrs; returns the attrs."""
    names = [spec.name for spec in specs]
    ws.remove(GROUP)  # objects of an earlier run must not linger under their old names
    for k, name in enumerate(names):
        ws.write_array(f"{GROUP}/{name}/raw", raws[k].astype(np.uint8))
        ws.write_array(f"{GROUP}/{name}/edit", edits[k].astype(np.uint8))
    attrs = {"names": names, "phrases": {s.name: s.phrase for s in specs},
             "overlap_pixels": overlap_report(names, pairs),
             "coverage": {name: coverage(raws[k]) for k, name in enumerate(names)}}
    ws.update_attrs(GROUP, **attrs)
    return attrs


def read_objects(ws: Workspace) -> dict[str, Any] | None:
    """The masks/objects attrs of a workspace, or None when it has none (made before named objects)."""
    if not ws.has(GROUP):
        return None
    return ws.group_attrs(GROUP)

