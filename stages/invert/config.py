"""Settings of `vd invert`: InvertConfig, its constants, resolution from stored settings, validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stages.common.config import Layer, build_config
from stages.common.errors import UsageError
from stages.io.workspace import Workspace
from stages.method.windows import check_window

GROUP = "inversion"
REGIONS = ("foreground", "background")
DEFAULT_STDG = {"foreground": (0.5, 0.5, 0.0, 0.5), "background": (0.5, 0.5, 0.5, 0.0)}
EARLY_STOP = 1e-5
EARLY_STOP_SLOPE = 2e-5
BASE_LR = 0.01
METHODS = ("null-text", "direct", "negative-prompt")  # how the null text / offsets are found (direct.py)
FLOAT_STATS = ("first_loss", "null_loss", "seconds")
STAT_COLUMNS = ("inner", "first_loss", "null_loss", "forwards", "gt_forwards", "backwards", "seconds")
# settings carried over from a stored inversion when a rerun does not give them (resume with `vd invert WS`)
CARRIED = ("prompt", "subject", "negative_prompt", "model", "steps", "cfg", "null_steps", "stdg", "region",
           "use_stdg", "shared_null", "schedule", "seed", "per_frame_groupnorm", "store_components", "plain",
           "dtype", "window", "overlap", "method")


@dataclass
class InvertConfig:
    """Settings of `vd invert` (preset section `invert:`, then CLI flags)."""

    prompt: str = ""
    subject: str | None = None
    negative_prompt: str = ""
    model: str = "sd15-animatediff-v3"
    steps: int = 50
    cfg: float = 7.5  # reference form eps_c + cfg (eps_c - eps_u) == diffusers guidance_scale cfg + 1
    null_steps: int = 10
    stdg: list[float] | None = None  # [eta_f, eta_b, zeta_f, zeta_b]; None: the region's default
    region: str = "foreground"
    use_stdg: bool = True
    shared_null: bool = False
    schedule: str = "vd"
    seed: int = 42
    per_frame_groupnorm: bool = True
    store_components: bool = False
    plain: bool = False
    compare_ddim: bool = False
    method: str = "null-text"  # null-text (the paper) | direct | negative-prompt (stages/invert/direct.py)
    window: int = 16  # frames per UNet call; longer clips run in overlapping windows (stages/windows.py)
    overlap: int = 4  # frames shared by neighbouring windows
    device: str = "auto"
    dtype: str = "auto"
    restart: bool = False
    preset: str | None = None
    checkpointing: str = "auto"  # off | blocks | layers | auto: recompute UNet blocks or layers in the backward

    def coefficients(self) -> tuple[float, float, float, float]:
        """Effective STDG coefficients (all zero with use_stdg off)."""
        if not self.use_stdg:
            return (0.0, 0.0, 0.0, 0.0)
        if self.stdg is None:
            return DEFAULT_STDG[self.region]
        from stages.method.guidance import parse_coefficients  # imports torch: only when needed (fast refusals)

        try:
            return parse_coefficients(self.stdg)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def resolve_config(ws: Workspace, *layers: dict[str, Any] | None) -> InvertConfig:
    """InvertConfig from the stored inversion's settings, then `layers` (preset, flags).

    Rerunning with fewer flags therefore resumes with the stored settings; a flag that differs from them
    is refused later by run_invert, unless restart (which keeps every stored setting not overridden). A
    stored subject that the prompt given instead no longer contains is dropped.
    """
    stored = dict(ws.group_attrs(GROUP).get("config") or {})
    base = Layer({k: v for k, v in stored.items() if k in CARRIED}, f"stored settings of {ws.path}/{GROUP}")
    cfg = build_config(InvertConfig, base, *layers)
    given = any("subject" in (layer or {}) and (layer or {})["subject"] is not None for layer in layers)
    if not given and cfg.subject and cfg.subject.strip().lower() not in cfg.prompt.lower():
        cfg.subject = None  # the subject belonged to the stored prompt, not to the one given now
    return cfg


def validate(cfg: InvertConfig) -> None:
    """Refuse settings that cannot work, with one-line messages."""
    from stages.common.config import check_config
    from stages.method.ddim import SCHEDULES

    check_config(cfg)  # types, finiteness, int64 (e.g. --seed): before anything is touched
    if not cfg.prompt or not cfg.prompt.strip():
        raise UsageError("--prompt is required: describe the source video (e.g. \"a brown bear walking on rocks\")")
    if cfg.subject is not None and cfg.subject.strip().lower() not in cfg.prompt.lower():
        raise UsageError(f"--subject {cfg.subject!r} does not occur in the prompt {cfg.prompt!r}")
    if cfg.region not in REGIONS:
        raise UsageError(f"region must be one of {', '.join(REGIONS)}, got {cfg.region!r}")
    if cfg.schedule not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 2 <= int(cfg.steps) <= 1000:
        raise UsageError(f"--steps must be in 2..1000, got {cfg.steps}")
    if not 0 <= int(cfg.null_steps) <= 10000:
        raise UsageError(f"--null-steps must be in 0..10000, got {cfg.null_steps}")
    if not cfg.model.strip():
        raise UsageError("--model must not be empty")
    if not math.isfinite(float(cfg.cfg)) or float(cfg.cfg) < 0:
        raise UsageError(f"--cfg must be a finite number >= 0, got {cfg.cfg}")
    if cfg.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.plain and cfg.method != "null-text":
        raise UsageError(f"--plain is the reference-cost baseline of null-text inversion; it does not apply to "
                         f"--method {cfg.method}")
    check_window(cfg.window, cfg.overlap)
    from stages.invert.checkpointing import MODES

    if cfg.checkpointing not in MODES:
        raise UsageError(f"--checkpointing must be one of {', '.join(MODES)}, got {cfg.checkpointing!r}")
    cfg.coefficients()
