"""What `vd eval` computes: its settings, the metric names and groups, and how metric values are written.

Non-finite values are stored and printed as JSON-safe values: +inf -> "inf", nan (empty region) -> null;
a metric that could not be computed is {"available": false, "reason", "how"}, never a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from stages.common.errors import UsageError

RECON = "reconstruction"
METRICS = ("psnr", "ssim", "lpips", "warp", "smoothness", "vbench", "clip", "pickscore", "seam")
GROUPS = {"all": METRICS, "fidelity": ("psnr", "ssim", "lpips"), "temporal": ("warp", "smoothness", "vbench"),
          "text": ("clip", "pickscore")}
OCCLUSION = {"alpha": 0.01, "beta": 0.5}


@dataclass
class EvalConfig:
    """What `vd eval` computes. Weight paths default to the VD_* environment variables."""

    edits: list[str] = field(default_factory=list)  # empty: reconstruction + every finished edit
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    lpips: str | None = None
    clip: str | None = None
    pickscore: str | None = None
    amt: str | None = None
    device: str = "auto"
    plot: bool = False
    store: bool = True


def parse_metrics(items: Iterable[str] | None) -> list[str]:
    """Expand a comma-separated / repeated metric list ('fidelity', 'temporal', 'text', 'all' allowed)."""
    chosen: list[str] = []
    for item in items or ["all"]:
        for name in (p.strip().lower() for p in item.split(",")):
            if not name:
                continue
            expanded = GROUPS.get(name, (name,))
            for m in expanded:
                if m not in METRICS:
                    raise UsageError(f"unknown metric {name!r}; choose from {', '.join(METRICS)} "
                                     f"or the groups {', '.join(GROUPS)}")
                if m not in chosen:
                    chosen.append(m)
    return [m for m in METRICS if m in chosen] or list(METRICS)


def metric_of(key: str) -> str:
    """The selectable metric a result key belongs to (psnr_unedited -> psnr, clip_score -> clip)."""
    if key.startswith("vbench"):
        return "vbench"
    if key.startswith("warp"):
        return "warp"
    if key.startswith("clip"):
        return "clip"
    return key.split("_")[0]


def unavailable(reason: str, how: str) -> dict[str, Any]:
    """The JSON shape of a metric that could not be computed."""
    return {"available": False, "reason": reason, "how": how}


def as_number(value: Any) -> float | None:
    """Read back a stored metric value: numbers and "inf"/"-inf" -> float; null/unavailable -> None."""
    if isinstance(value, bool) or value is None or isinstance(value, dict):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("inf", "-inf"):
        return float(value)
    return None


def clip_mean(values: Iterable[float]) -> float:
    """Mean of per-frame values ignoring nan (empty regions); inf if any value is inf; nan if none left."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return float("nan")
    if any(math.isinf(v) for v in vals):
        return float("inf") if max(vals) == float("inf") else float("-inf")
    return float(np.mean(vals))
