"""Synthetic clips with known ground truth: a disc moving over a textured background.

Used by the demo and the tests (no downloads): frames are uint8 (F, H, W, 3) and the ground-truth
object mask is uint8 (F, H, W) in {0, 1}.
"""

from __future__ import annotations

import numpy as np


def moving_disc(frames: int = 8, height: int = 128, width: int = 128, seed: int = 0,
                radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A reddish disc sliding left to right over a smooth textured background, with its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        0.45 + 0.25 * np.sin(xx / 9.0 + 0.5) * np.cos(yy / 13.0),
        0.55 + 0.2 * np.sin((xx + yy) / 17.0),
        0.35 + 0.25 * np.cos(yy / 7.0 - xx / 23.0),
    ], axis=-1)
    base += rng.normal(0, 0.02, size=base.shape).astype(np.float32)
    radius = radius if radius is not None else min(height, width) * 0.18
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    masks = np.empty((frames, height, width), dtype=np.uint8)
    for f in range(frames):
        cx = width * (0.3 + 0.4 * f / max(frames - 1, 1))
        cy = height * (0.5 + 0.08 * np.sin(f / 2.0))
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        img = base.copy()
        shade = 0.85 + 0.15 * np.cos((xx - cx) / radius * 1.5)
        img[inside] = np.stack([0.9 * shade, 0.25 * shade, 0.2 * shade], axis=-1)[inside]
        video[f] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
        masks[f] = inside.astype(np.uint8)
    return video, masks


RED, BLUE = (230, 40, 40), (40, 70, 230)


def two_discs(frames: int = 6, height: int = 64, width: int = 96, seed: int = 0, radius: float | None = None,
              gap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A red disc (left) and a blue disc (right) drifting towards each other over a grey textured background.

    `gap`: the space between the discs' edges on the last frame, in pixels (default: a quarter of the
    width; 0 or less makes them touch or overlap, the blue one drawn on top). Returns frames uint8
    (F, H, W, 3) and masks uint8 (2, F, H, W): [red, blue], each the disc's full extent (they overlap
    where the discs do).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    grey = 0.5 + 0.12 * np.sin(xx / 7.0) * np.cos(yy / 9.0) + rng.normal(0, 0.015, (height, width))
    base = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    radius = radius if radius is not None else min(height, width) * 0.2
    gap = gap if gap is not None else width * 0.25
    start, end = width * 0.5, 2 * radius + gap  # centre distance on the first and the last frame
    video = np.empty((frames, height, width, 3), np.uint8)
    masks = np.zeros((2, frames, height, width), np.uint8)
    for f in range(frames):
        distance = start + (end - start) * f / max(frames - 1, 1)
        img = base.copy()
        for k, (colour, side, dy) in enumerate(((RED, -1, -0.04), (BLUE, 1, 0.04))):
            cx, cy = width / 2 + side * distance / 2, height * (0.5 + dy)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
            img[inside] = np.asarray(colour, np.float32) / 255.0
            masks[k, f] = inside
        video[f] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return video, masks
