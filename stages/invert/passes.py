"""UNet-call accounting for the inversion: counted (and optionally timed) calls, blended over windows."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from stages.common.errors import UsageError
from stages.invert.config import InvertConfig
from stages.method.windows import Windows, blend, plan_windows


class PhaseTimer:
    """Optional wall-clock profile of the null-text steps (`bench.py --profile`): seconds per phase per step.

    Pass one to run_invert(timer=...); without one every phase guard is a shared no-op context. On CUDA
    each phase boundary synchronises, so the figures are attributable (and the profiled run is slower).
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []  # per null-text step: {phase: seconds, "step": i, "total": s}
        self._sync: Any = None
        self._t0 = 0.0

    def bind(self, device: Any) -> None:
        import torch

        self._sync = torch.cuda.synchronize if getattr(device, "type", "") == "cuda" else None

    def begin(self, i: int) -> None:
        """Start step i (its phases accumulate until end())."""
        self.steps.append({"step": float(i)})
        self._t0 = time.perf_counter()

    def end(self) -> None:
        """Close the current step: its "total" becomes the step's wall-clock seconds."""
        if self._sync:
            self._sync()
        self.steps[-1]["total"] = time.perf_counter() - self._t0

    @contextlib.contextmanager
    def __call__(self, name: str) -> Any:
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            if self.steps:
                self.steps[-1][name] = self.steps[-1].get(name, 0.0) + time.perf_counter() - t0


_OFF = contextlib.nullcontext()


class Passes:
    """UNet calls with counters: sample-forwards (batch entries), GT forwards, backward passes."""

    def __init__(self, models: Any, timer: PhaseTimer | None = None, windows: Windows | None = None):
        self.models = models
        self.windows = windows  # whole-clip calls run window by window and are blended
        self.forwards = 0
        self.gt_forwards = 0
        self.backwards = 0
        self.timer = timer

    def phase(self, name: str) -> Any:
        """Context timing `name` when profiling; a shared no-op otherwise."""
        return self.timer(name) if self.timer is not None else _OFF

    def eps(self, z: Any, t: int, emb: Any, gt: bool = False) -> Any:
        """Noise prediction for z (B, F, 4, h, w); a whole clip longer than one window is blended over windows.

        emb: (B*F, 77, D) batch-major, frame-minor. Window-sized calls (F < the clip) run as they are.
        """
        windows = self.windows
        if windows is None or windows.single or int(z.shape[1]) != windows.frames:
            return self.eps_window(z, t, emb, gt)
        b, f = int(z.shape[0]), int(z.shape[1])
        rows = emb.reshape(b, f, *emb.shape[1:])
        return blend(windows, lambda s, e: self.eps_window(z[:, s:e], t, rows[:, s:e].reshape(-1, *emb.shape[1:]),
                                                           gt))

    def eps_window(self, z: Any, t: int, emb: Any, gt: bool = False) -> Any:
        """One UNet call on z as given (one window), counted."""
        from stages.models.ops import unet_eps

        if gt:
            self.gt_forwards += int(z.shape[0])
        else:
            self.forwards += int(z.shape[0])
        return unet_eps(self.models, z, t, emb)

    def snapshot(self) -> tuple[int, int, int]:
        return self.forwards, self.gt_forwards, self.backwards


def clip_windows(frames: int, cfg: InvertConfig, max_frames: int) -> Windows:
    """The clip's windows for this inversion (one window when it fits); refuses what cannot run."""
    if int(cfg.window) > max_frames:
        raise UsageError(f"--window {cfg.window} exceeds the motion module's maximum of {max_frames} frames")
    windows = plan_windows(frames, int(cfg.window), int(cfg.overlap))
    if cfg.plain and not windows.single:
        raise UsageError(f"--plain (the reference-cost baseline) runs one window; {frames} frames need "
                         f"--window >= {frames}")
    return windows
