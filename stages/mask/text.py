"""`--text PHRASE`: the box of an object found by the zero-shot detector on the prompt frame.

Each distinct phrase is detected once. An object takes the best candidate that holds all of its own
object points (when it has any: `--text dog --point X,Y` picks the dog at X,Y) and that no earlier object
took (two objects with the same phrase get different boxes, best first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stages.common.errors import InputError
from stages.mask.objects import ObjectSpec
from stages.models import detector as det

TAKEN_IOU = 0.5  # a candidate overlapping an assigned box this much is the same thing


def _holds(box: Sequence[float], points: Sequence[tuple[float, float, int]]) -> bool:
    return all(box[0] <= x <= box[2] and box[1] <= y <= box[3] for x, y, label in points if label == 1)


def assign_boxes(specs: Sequence[ObjectSpec], candidates: dict[str, list[det.Detection]], threshold: float,
                 prompt_frame: int) -> dict[str, det.Detection]:
    """Pick one detection per object with --text (see the module doc); InputError when one has none."""
    chosen: dict[str, det.Detection] = {}
    for spec in specs:
        if spec.text is None:
            continue
        found = candidates.get(spec.text, [])
        fits = [d for d in found if _holds(d.box, spec.points)]
        free = [d for d in fits if all(det.box_iou(d.box, c.box) <= TAKEN_IOU for c in chosen.values())]
        if free and free[0].score >= threshold:
            chosen[spec.name] = free[0]
            continue
        best = max((d.score for d in free), default=None)
        why = f"best {best:.2f}" if best is not None else "no candidate"
        if fits and not free:
            why = "its candidates are taken by other objects"
        elif found and not fits:
            why = "no candidate holds the object's --point"
        raise InputError(f"--text {spec.text!r} (object {spec.name!r}): nothing found on frame {prompt_frame} "
                         f"with score >= {threshold:g} ({why}); lower --text-threshold or give --box/--point")
    return chosen


def boxes_from_text(specs: Sequence[ObjectSpec], image: np.ndarray, folder: str | Path, threshold: float,
                    prompt_frame: int, device: str = "auto", progress: Any = None) -> dict[str, det.Detection]:
    """Detect every --text phrase on `image` (the prompt frame) and assign one box per object; `folder` is the
    detector's folder or detector.RANDOM (the tiny untrained one)."""
    phrases = list(dict.fromkeys(spec.text for spec in specs if spec.text is not None))
    if not phrases:
        return {}
    if folder == det.RANDOM:
        if progress is not None:
            progress.log(f"detector: {det.RANDOM_NAME} (untrained Grounding DINO, random weights: its boxes "
                         f"mean nothing; tests the plumbing only)")
        model = det.random_detector(phrases, device)
    else:
        if progress is not None:
            progress.log(f"detector: {folder}")
        model = det.load_detector(folder, device)
    candidates = {phrase: det.detect(model, image, phrase) for phrase in phrases}
    chosen = assign_boxes(specs, candidates, threshold, prompt_frame)
    if progress is not None:
        for name, found in chosen.items():
            box = ",".join(f"{v:.0f}" for v in found.box)
            progress.log(f"--text: object {name} at box {box} (score {found.score:.2f})")
    return chosen
