"""Stage: vd eval. Scores the inversion's reconstruction and the edits of a workspace and stores the
results under eval/<name> (many workspaces: stages/evaluate/table.py).

Metric definitions live in stages/quality/metrics.py and docs/commands/eval.md. Optional metrics whose
weights are not present locally are reported as {"available": false, "reason", "how"}, never as a number.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.jsonsafe import json_safe
from stages.common.progress import Progress
from stages.evaluate.config import (GROUPS, RECON, EvalConfig, clip_mean, metric_of, parse_metrics,
                                    unavailable)
from stages.evaluate.fresh import item_settings, refuse_stale, stored_fresh
from stages.evaluate.inputs import SourceClip, select_items, target_prompt
from stages.evaluate.plots import write_plots
from stages.evaluate.scorers import Scorers
from stages.evaluate.seam import export_seam
from stages.io.workspace import Workspace
from stages.quality import metrics as M


def _fidelity(clip: SourceClip, frames: np.ndarray, regions: dict[str, np.ndarray | None], metrics: list[str],
              scorers: Scorers, out: dict[str, Any], per_frame: dict[str, Any]) -> None:
    """PSNR / SSIM / LPIPS between source and `frames` for each named region (suffix -> mask or None)."""
    src, n = clip.source, len(frames)
    for suffix, region in regions.items():
        if "psnr" in metrics:
            vals = [M.psnr(src[f], frames[f], None if region is None else region[f]) for f in range(n)]
            out[f"psnr{suffix}"], per_frame[f"psnr{suffix}"] = clip_mean(vals), vals
    if "ssim" in metrics:  # one SSIM map per frame, averaged over each region
        maps = [M.ssim_map(src[f], frames[f]) for f in range(n)]
        for suffix, region in regions.items():
            vals = [M.region_mean(maps[f], None if region is None else region[f]) for f in range(n)]
            out[f"ssim{suffix}"], per_frame[f"ssim{suffix}"] = clip_mean(vals), vals
    if "lpips" not in metrics:
        return
    net = scorers.get("lpips")
    if isinstance(net, dict):
        for suffix in regions:
            out[f"lpips{suffix}"] = net
        return
    if min(src.shape[1:3]) < 32:
        for suffix in regions:
            out[f"lpips{suffix}"] = unavailable("frames smaller than 32 px", "evaluate larger frames")
        return
    values, maps = M.lpips_maps(net, src, frames)
    for suffix, region in regions.items():
        vals = values.tolist() if region is None else [M.region_mean(maps[f], region[f]) for f in range(n)]
        out[f"lpips{suffix}"], per_frame[f"lpips{suffix}"] = clip_mean(vals), vals


def _evaluate_edit(clip: SourceClip, name: str, frames: np.ndarray, attrs: dict[str, Any], metrics: list[str],
                   scorers: Scorers) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    background = bool((attrs.get("params") or {}).get("background", False))
    unedited = clip.raw if background else ~clip.mask
    edited = ~unedited
    out: dict[str, Any] = {}
    per_frame: dict[str, Any] = {}
    _fidelity(clip, frames, {"_unedited": unedited}, metrics, scorers, out, per_frame)
    n = len(frames)
    if "warp" in metrics:
        if n < 2:
            out["warp_error"] = unavailable("needs at least 2 frames", "evaluate a longer clip")
        else:
            fwd, bwd = clip.flows
            src = clip.source
            series = {
                "warp_error": [M.warp_error(frames[f], frames[f + 1], fwd[f], bwd[f]) for f in range(n - 1)],
                "warp_error_edited": [M.warp_error(frames[f], frames[f + 1], fwd[f], bwd[f], edited[f])
                                      for f in range(n - 1)],
                "warp_error_source": [M.warp_error(src[f], src[f + 1], fwd[f], bwd[f]) for f in range(n - 1)],
            }
            for key, vals in series.items():
                out[key], per_frame[key] = clip_mean(vals), vals
            out.update(seam_metrics(series["warp_error"], clip.seam_pairs))
    if "smoothness" in metrics:
        for key, video in (("smoothness", frames), ("smoothness_source", clip.source)):
            vals = M.smoothness_proxy(video).tolist()
            out[key], per_frame[key] = clip_mean(vals), vals
    if "vbench" in metrics:
        interp = scorers.get("vbench")
        out["vbench_smoothness"] = interp if isinstance(interp, dict) else M.interpolation_smoothness(frames, interp)
    prompt = target_prompt(attrs)
    for metric, key in (("clip", "clip_score"), ("pickscore", "pickscore")):
        if metric not in metrics:
            continue
        scorer = scorers.get(metric)
        if isinstance(scorer, dict):
            out[key] = scorer
        elif prompt is None:
            out[key] = unavailable(f"edit {name!r} has no prompt attribute", "rerun `vd edit`")
        else:
            cos, scale = M.clip_similarity(scorer[0], scorer[1], frames, prompt, scorers.device)
            vals = (M.clip_score(cos) if metric == "clip" else M.pick_score(cos, scale)).tolist()
            out[key], per_frame[key] = clip_mean(vals), vals
    exported = None
    if "seam" in metrics:  # the export's boundary ring (stages/evaluate/seam.py); n/a without an export
        values, series, exported = export_seam(clip.ws, name, attrs)
        out.update(values)
        per_frame.update(series)
    info = {"kind": "edit", "prompt": prompt, "background": background,
            "region": "inside masks/raw (the object)" if background else "outside masks/edit"}
    if exported:
        info["export"] = exported
    return out, per_frame, info


def run_eval(workspace: Workspace | str | Path, config: EvalConfig, progress: Progress | None = None,
             scorers: Scorers | None = None, reuse: bool = False) -> dict[str, Any]:
    """Evaluate a workspace; store eval/<name> attrs (metrics, per_frame, settings) and return the results.

    With `reuse`, stored results whose fingerprint, metric list and weights still match are returned
    instead of being recomputed (used by `compare`).
    """
    progress = progress or Progress(quiet=True)
    ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    metrics = parse_metrics(config.metrics)
    targets, skipped = select_items(ws, config, metrics)
    refuse_stale(ws, targets)  # stale work is never scored (stages.evaluate.fresh)
    scorers = scorers or Scorers(config)
    clip = SourceClip(ws)
    items: dict[str, Any] = {}
    with progress.task(f"eval {ws.path.name}", total=len(targets)) as advance:
        for name in targets:
            start = time.monotonic()
            frames = clip.frames(name)
            attrs = {} if name == RECON else ws.group_attrs(f"edits/{name}")
            settings = item_settings(clip, frames, attrs, metrics, scorers.describe())
            stored = ws.group_attrs(f"eval/{name}") if reuse else {}
            if stored and stored_fresh(stored.get("settings", {}), settings):
                keep = {k: v for k, v in stored["metrics"].items() if metric_of(k) in metrics}
                frames_kept = {k: v for k, v in stored.get("per_frame", {}).items() if metric_of(k) in metrics}
                items[name] = {"metrics": keep, "per_frame": frames_kept,
                               **stored["settings"].get("info", {}), "reused": True}
                advance(1)
                continue
            if name == RECON:
                out: dict[str, Any] = {}
                per_frame: dict[str, Any] = {}
                _fidelity(clip, frames, {"": None, "_inside": clip.mask, "_outside": ~clip.mask},
                          [m for m in metrics if m in GROUPS["fidelity"]], scorers, out, per_frame)
                if "warp" in metrics and clip.seam_pairs:  # long clips: are the window seams visible?
                    fwd, bwd = clip.flows
                    vals = [M.warp_error(frames[f], frames[f + 1], fwd[f], bwd[f]) for f in range(len(frames) - 1)]
                    out["warp_error"], per_frame["warp_error"] = clip_mean(vals), vals
                    out.update(seam_metrics(vals, clip.seam_pairs))
                info = {"kind": RECON, "region": "whole frame; inside / outside masks/edit"}
            else:
                out, per_frame, info = _evaluate_edit(clip, name, frames, attrs, metrics, scorers)
            out, per_frame = json_safe(out), json_safe(per_frame)
            settings.update(info=info, seconds=round(time.monotonic() - start, 3),
                            evaluated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            if config.store:
                ws.update_attrs(f"eval/{name}", metrics=out, per_frame=per_frame, settings=settings)
            items[name] = {"metrics": out, "per_frame": per_frame, **info}
            advance(1)
    result: dict[str, Any] = {"workspace": str(ws.path), "metrics": metrics, "items": items}
    if skipped:
        result["skipped"] = skipped
    if config.plot:
        result["plots"] = write_plots(ws, items)
    return result


def seam_metrics(warp: list[float], seam_pairs: list[int] | None) -> dict[str, Any]:
    """Warp error on the frame pairs at window borders vs the pairs inside windows (empty with one window)."""
    if not seam_pairs:
        return {}
    inside = [v for f, v in enumerate(warp) if f not in seam_pairs]
    return {"warp_error_seam": clip_mean([warp[f] for f in seam_pairs if f < len(warp)]),
            "warp_error_inside": clip_mean(inside) if inside else None}
