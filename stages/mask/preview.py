"""masks/preview.gif for several objects: one colour per object, its name drawn at its centre."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from stages.io import video as vid

# distinct on most footage; the first is the single-object preview's blue
PALETTE = ((30, 144, 255), (255, 64, 64), (60, 200, 90), (255, 200, 0), (190, 90, 255), (0, 210, 210),
           (255, 128, 0), (255, 105, 180))


def colour(index: int) -> tuple[int, int, int]:
    """The preview colour of object `index` (the palette repeats after 8 objects)."""
    return PALETTE[index % len(PALETTE)]


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    inside = mask != 0
    return inside & ~np.stack([binary_erosion(m, iterations=max(1, m.shape[0] // 256)) for m in inside])


def draw_names(frames: np.ndarray, names: Sequence[str], raws: Sequence[np.ndarray]) -> np.ndarray:
    """Write each object's name (in its colour, outlined in black) at its mask's centre on every frame."""
    import cv2

    out = frames.copy()
    height = frames.shape[1]
    scale = max(0.3, height / 512.0 * 0.6)
    thick = max(1, int(round(scale * 2)))
    for k, (name, raw) in enumerate(zip(names, raws)):
        for f in range(len(out)):
            ys, xs = np.nonzero(raw[f])
            if not len(xs):
                continue
            (w, h), _ = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
            x = int(np.clip(xs.mean() - w / 2, 0, max(0, out.shape[2] - w)))
            y = int(np.clip(ys.mean() + h / 2, h, out.shape[1] - 1))
            frame = np.ascontiguousarray(out[f])
            cv2.putText(frame, name, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
            cv2.putText(frame, name, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour(k), thick, cv2.LINE_AA)
            out[f] = frame
    return out


def preview_objects(frames: np.ndarray, names: Sequence[str], raws: Sequence[np.ndarray],
                    edits: Sequence[np.ndarray], labels: bool = True) -> np.ndarray:
    """Frames with each object's raw mask tinted in its colour, its ellipse extension lightly tinted,
    every edit mask outlined in white, and (with `labels`) the names written on."""
    out = frames
    for k, (raw, edit) in enumerate(zip(raws, edits)):
        out = vid.overlay_mask(out, raw, colour(k), 0.5)
        extra = (edit != 0) & (raw == 0)
        if extra.any():
            out = vid.overlay_mask(out, extra, colour(k), 0.2)
    out = out.copy()
    for edit in edits:
        out[_outline(edit)] = 255
    return draw_names(out, names, raws) if labels else out


def draw_prompts(frames: np.ndarray, prompts: Sequence[tuple[Sequence[Sequence[float]], Sequence[float] | None]],
                 frame: int | None = None) -> np.ndarray:
    """Draw each object's prompts in its colour (as SAM2's demo does): its box outlined, its points as dots
    ringed white (object, LABEL 1) or ringed black with a black bar (background, LABEL 0). `prompts` holds
    (points [(x, y, label)], box (x0, y0, x1, y1) or None) per object in object order; `frame`: only that
    frame (the prompt frame), else every frame."""
    import cv2

    out = np.array(frames, dtype=np.uint8, copy=True)
    height, width = out.shape[1:3]
    radius = max(2, int(round(min(height, width) / 80)))
    thick = max(1, int(round(min(height, width) / 256)))
    for f in range(len(out)) if frame is None else [frame]:
        image = np.ascontiguousarray(out[f])
        for k, (points, box) in enumerate(prompts):
            tint = colour(k)
            if box is not None:
                x0, y0, x1, y1 = (int(round(v)) for v in box)
                cv2.rectangle(image, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), tint, thick)
            for x, y, label in points:
                centre = (int(round(x)), int(round(y)))
                ring = (255, 255, 255) if int(label) else (0, 0, 0)
                cv2.circle(image, centre, radius + thick, ring, -1, cv2.LINE_AA)
                cv2.circle(image, centre, radius, tint, -1, cv2.LINE_AA)
                if not int(label):
                    cv2.line(image, (centre[0] - radius, centre[1]), (centre[0] + radius, centre[1]), ring, thick)
        out[f] = image
    return out
