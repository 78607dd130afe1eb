"""The prompts of `vd mask` in output pixels: points, boxes, and the checks that they lie inside the frame."""

from __future__ import annotations

import math

import numpy as np

from stages.common.errors import InputError, UsageError


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' (label 1 = object, 0 = background) -> (x, y, label)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise UsageError(f"--point {text!r} must be X,Y or X,Y,LABEL (numbers; LABEL 1 object, 0 background)") from None
    if label not in (0, 1) or not (math.isfinite(x) and math.isfinite(y)):
        raise UsageError(f"--point {text!r}: LABEL must be 1 (object) or 0 (background)")
    return x, y, label


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' -> floats with X0 < X1 and Y0 < Y1."""
    try:
        values = tuple(float(p) for p in str(text).split(","))
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError
    except ValueError:
        raise UsageError(f"--box {text!r} must be X0,Y0,X1,Y1 (four numbers)") from None
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"--box {text!r}: need X0 < X1 and Y0 < Y1")
    return x0, y0, x1, y1


def check_prompts_inside(points: list[tuple[float, float, int]], box: tuple[float, ...] | None,
                          height: int, width: int) -> None:
    for x, y, _ in points:
        if not (0 <= x < width and 0 <= y < height):
            raise InputError(f"--point {x:g},{y:g} is outside the {width}x{height} output frame "
                             f"(coordinates are in output pixels)")
    if box is not None:
        x0, y0, x1, y1 = box
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise InputError(f"--box {x0:g},{y0:g},{x1:g},{y1:g} is outside the {width}x{height} output frame "
                             f"(coordinates are in output pixels)")


def box_mask(box: tuple[float, float, float, float], frames: int, height: int, width: int) -> np.ndarray:
    """The same filled rectangle on every frame (uint8 0/1)."""
    x0, y0, x1, y1 = box
    mask = np.zeros((frames, height, width), np.uint8)
    mask[:, int(math.floor(y0)):int(math.ceil(y1)), int(math.floor(x0)):int(math.ceil(x1))] = 1
    return mask
