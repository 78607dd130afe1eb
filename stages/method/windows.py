"""Overlapping temporal windows: clips longer than the motion module's reach, with flat memory.

The F frames are covered by windows of W frames that overlap by O frames. Every UNet evaluation runs
window by window; per-frame outputs (noise predictions, STDG gradients) of overlapping windows are mixed
with weights that ramp linearly across the overlap, so every frame's value is a convex combination and a
frame covered by one window takes that window's value alone. A clip of <= W frames is one window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from stages.common.errors import UsageError

MAX_WINDOW = 32  # the AnimateDiff motion module's positional table
DEFAULT_WINDOW = 16
DEFAULT_OVERLAP = 4


def check_window(window: int, overlap: int, max_window: int = MAX_WINDOW) -> None:
    """One-line UsageErrors for window settings that cannot work."""
    if not 1 <= int(window) <= max_window:
        raise UsageError(f"--window must be in 1..{max_window} (the motion module sees at most {max_window} "
                         f"frames), got {window}")
    if not 0 <= int(overlap) < int(window):
        raise UsageError(f"--overlap must be in 0..{int(window) - 1} (less than --window {window}), got {overlap}")


@dataclass(frozen=True)
class Windows:
    """The windows of a clip: `spans[k] = (start, end)`, and per-window frame weights."""

    frames: int
    window: int
    overlap: int
    spans: tuple[tuple[int, int], ...]

    @property
    def single(self) -> bool:
        return len(self.spans) == 1

    def weights(self) -> list[list[float]]:
        """weights[k][j]: the weight of window k for its j-th frame; per frame they sum to 1."""
        raw = []
        for s, e in self.spans:
            row = []
            for f in range(s, e):
                left = f - s + 1 if s > 0 else self.window  # no ramp at the clip's own ends
                right = e - f if e < self.frames else self.window
                row.append(min(1.0, left / (self.overlap + 1), right / (self.overlap + 1)))
            raw.append(row)
        total = [0.0] * self.frames
        for (s, _), row in zip(self.spans, raw):
            for j, w in enumerate(row):
                total[s + j] += w
        return [[w / total[s + j] for j, w in enumerate(row)] for (s, _), row in zip(self.spans, raw)]

    def borders(self) -> list[int]:
        """Frames where a window starts or ends inside the clip (the seams' neighbourhoods)."""
        out = set()
        for s, e in self.spans:
            if s > 0:
                out.add(s)
            if e < self.frames:
                out.add(e - 1)
        return sorted(out)

    def describe(self) -> dict[str, Any]:
        return {"window": self.window, "overlap": self.overlap, "spans": [list(s) for s in self.spans]}


def plan_windows(frames: int, window: int = DEFAULT_WINDOW, overlap: int = DEFAULT_OVERLAP) -> Windows:
    """Deterministic windows covering `frames`: stride W - O from frame 0, the last one aligned to the end."""
    check_window(window, overlap)
    frames, window, overlap = int(frames), int(window), int(overlap)
    if frames <= window:
        return Windows(frames, window, overlap, ((0, frames),))
    stride = window - overlap
    starts = list(range(0, frames - window, stride)) + [frames - window]
    starts = sorted(set(starts))
    return Windows(frames, window, overlap, tuple((s, s + window) for s in starts))


def blend(windows: Windows, run: Callable[[int, int], Any], frame_dim: int = 1) -> Any:
    """Mix per-window outputs: `run(start, end)` returns a tensor whose `frame_dim` holds end - start frames.

    One window's outputs are alive at a time besides the accumulator. A single window returns `run`'s
    output unchanged (bit for bit).
    """
    import torch

    if windows.single:
        s, e = windows.spans[0]
        return run(s, e)
    out = None
    for (s, e), w in zip(windows.spans, windows.weights()):
        part = run(s, e)
        shape = [1] * part.ndim
        shape[frame_dim] = e - s
        weight = torch.tensor(w, dtype=part.dtype, device=part.device).reshape(shape)
        if out is None:
            full = list(part.shape)
            full[frame_dim] = windows.frames
            out = torch.zeros(full, dtype=part.dtype, device=part.device)
        out.narrow(frame_dim, s, e - s).add_(part * weight)
    return out


def weight_tensor(windows: Windows, k: int, like: Any, frame_dim: int = 1) -> Any:
    """Window k's frame weights shaped to broadcast against a window-sized tensor like `like`."""
    import torch

    s, e = windows.spans[k]
    shape = [1] * like.ndim
    shape[frame_dim] = e - s
    return torch.tensor(windows.weights()[k], dtype=like.dtype, device=like.device).reshape(shape)
