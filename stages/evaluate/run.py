"""Stage: vd eval. Scores the inversion's reconstruction and the edits of a workspace, stores the
results under eval/<name>, and aggregates many workspaces (`compare`, the paper's Table 1).

Metric definitions live in stages/metrics.py and notes/readme-eval.md. Optional metrics whose weights
are not present locally are reported as {"available": false, "reason", "how"}, never as a number.
Non-finite values are stored and printed as JSON-safe values: +inf -> "inf", nan (empty region) -> null.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from stages import __version__
from stages.quality import metrics as M
from stages.common.errors import InputError, UsageError
from stages.common.progress import Progress
from stages.io.workspace import Workspace, check_name, json_safe
from stages.common.digest import digest
from stages.common.errors import first_line

RECON = "reconstruction"
METRICS = ("psnr", "ssim", "lpips", "warp", "smoothness", "vbench", "clip", "pickscore")
GROUPS = {"all": METRICS, "fidelity": ("psnr", "ssim", "lpips"), "temporal": ("warp", "smoothness", "vbench"),
          "text": ("clip", "pickscore")}
OCCLUSION = {"alpha": 0.01, "beta": 0.5}

HOW = {
    "lpips": "pass --lpips PATH or set VD_LPIPS=PATH: one .safetensors/.pth holding torchvision AlexNet or "
             "VGG16 `features.*` plus LPIPS `lin0..lin4` weights, or a folder with both files "
             "(e.g. alexnet-owt-7be5be79.pth + the lpips project's weights/v0.1/alex.pth), "
             "or run `vd models --get lpips`",
    "clip": "pass --clip DIR or set VD_CLIP=DIR: a local Hugging Face CLIP folder "
            "(e.g. a copy of openai/clip-vit-large-patch14 with its processor files), "
            "or run `vd models --get clip`",
    "pickscore": "pass --pickscore DIR or set VD_PICKSCORE=DIR: a local copy of yuvalkirstain/PickScore_v1; "
                 "if it lacks processor files set VD_PICKSCORE_PROCESSOR to a copy of "
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K; or run `vd models --get pickscore`",
    "vbench": "install the vbench package and put VBench's AMT-S checkpoint at ~/.cache/vbench/amt_model/amt-S.pth "
              "or pass --amt PATH / set VD_AMT=PATH",
}


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


# ----------------------------------------------------------------------------- optional models


class Scorers:
    """Optional model-based metrics, loaded once (and shared between workspaces in `compare`)."""

    def __init__(self, config: EvalConfig):
        self.paths = {
            "lpips": _configured(config.lpips, "VD_LPIPS", "--lpips") or _downloaded("lpips"),
            "clip": _configured(config.clip, "VD_CLIP", "--clip") or _downloaded("clip"),
            "pickscore": _configured(config.pickscore, "VD_PICKSCORE", "--pickscore") or _downloaded("pickscore"),
            "vbench": _configured(config.amt, "VD_AMT", "--amt") or _default_amt(),
        }
        self.device_name = config.device
        self._cache: dict[str, Any] = {}

    def describe(self) -> dict[str, str | None]:
        """Weight paths in use (stored in the eval settings)."""
        return {k: (str(v) if v else None) for k, v in self.paths.items()}

    @property
    def device(self) -> str:
        if self.device_name != "auto":
            return self.device_name
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def get(self, name: str) -> Any:
        """The loaded scorer for `name`, or an `unavailable(...)` dict."""
        if name not in self._cache:
            self._cache[name] = self._load(name)
        return self._cache[name]

    def _load(self, name: str) -> Any:
        path = self.paths[name]
        if name == "vbench":
            return _load_amt(path, self.device)
        if path is None:
            return unavailable(f"{name} weights not configured", HOW[name])
        if name == "lpips":
            net = M.lpips_from_state_dict(M.load_state_files(path), str(path))
            net.device = self.device
            return net
        processor = None
        if name == "pickscore":  # PickScore_v1 ships without processor files; they may live elsewhere
            processor = (_configured(None, "VD_PICKSCORE_PROCESSOR", "VD_PICKSCORE_PROCESSOR")
                         or _downloaded("pickscore-processor"))
        return _load_clip(path, processor or path, name)


def _configured(value: str | None, env: str, flag: str) -> Path | None:
    raw = value or os.environ.get(env) or None
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.exists():
        raise InputError(f"{flag} {raw}: no such file or folder")
    return path


def _downloaded(name: str) -> Path | None:
    """Weights `vd models --get NAME` put into the standard caches (used when nothing is configured)."""
    from stages.models.fetch import locate

    try:
        return locate(name)
    except ImportError:  # huggingface_hub missing: nothing can have been downloaded
        return None


def _default_amt() -> Path | None:
    path = Path.home() / ".cache" / "vbench" / "amt_model" / "amt-S.pth"
    return path if path.is_file() else None


def _load_clip(path: Path, processor_path: Path, name: str) -> Any:
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
    except Exception as exc:
        raise InputError(f"--{name} {path} is not a loadable local CLIP model folder: {first_line(exc)}") from None
    try:
        processor = CLIPProcessor.from_pretrained(str(processor_path), local_files_only=True)
    except Exception as exc:
        hint = " (set VD_PICKSCORE_PROCESSOR to a folder with the CLIP-ViT-H-14 processor files)" \
            if name == "pickscore" else ""
        raise InputError(f"no usable CLIP processor in {processor_path}{hint}: {first_line(exc)}") from None
    return model, processor


def _load_amt(path: Path | None, device: str) -> Any:
    """VBench's AMT-S interpolator as a function (a, b) -> middle frame, or unavailable."""
    try:
        import vbench  # noqa: F401
        from omegaconf import OmegaConf
        from vbench.third_party.amt.utils.build_utils import build_from_cfg
    except ImportError:
        return unavailable("the vbench package is not installed", HOW["vbench"])
    if path is None:
        return unavailable("VBench AMT-S weights not found", HOW["vbench"])
    import torch
    import torch.nn.functional as F

    cfg = Path(vbench.__file__).parent / "third_party" / "amt" / "cfgs" / "AMT-S.yaml"
    try:
        net = build_from_cfg(OmegaConf.load(str(cfg)).network)
        net.load_state_dict(M.load_state_files(path))
    except Exception as exc:
        return unavailable(f"cannot load AMT-S from {path}: {first_line(exc)}", HOW["vbench"])
    net = net.to(device).eval()
    embt = torch.full((1, 1, 1, 1), 0.5, device=device)

    def interpolate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        h, w = a.shape[:2]
        pad = (0, (-w) % 16, 0, (-h) % 16)

        def prep(x: np.ndarray) -> Any:
            t = torch.as_tensor(x, dtype=torch.float32, device=device).permute(2, 0, 1)[None] / 255.0
            return F.pad(t, pad, mode="replicate")

        with torch.no_grad():
            mid = net(prep(a), prep(b), embt, scale_factor=1.0, eval=True)["imgt_pred"][0, :, :h, :w]
        return (mid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()

    return interpolate


# ----------------------------------------------------------------------------- workspace readers


def edit_names(ws: Workspace) -> list[str]:
    """Names of the edit groups in the workspace (finished or not)."""
    root = ws.path / "edits"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "zarr.json").is_file())


def _target_prompt(attrs: dict[str, Any]) -> str | None:
    for key in ("resolved_prompt", "target_prompt", "resolved prompt", "prompt"):
        if isinstance(attrs.get(key), str) and attrs[key]:
            return attrs[key]
    return None


def _select(ws: Workspace, config: EvalConfig, metrics: list[str]) -> tuple[list[str], dict[str, str]]:
    """Which names to evaluate, and which were skipped (unfinished edits) with why."""
    names = edit_names(ws)
    has_recon = ws.has("inversion/reconstruction")
    if RECON in names:
        raise InputError(f"an edit is named {RECON!r}, which eval reserves for the inversion; delete "
                         f"{ws.path / 'edits' / RECON} and redo that edit with `vd edit --name OTHER`")
    skipped: dict[str, str] = {}
    if config.edits:
        targets = []
        for name in dict.fromkeys(config.edits):
            check_name(name)
            if name == RECON:
                if not has_recon:
                    raise InputError(f"{ws.path} has no inversion/reconstruction; run `vd invert` first")
            elif name not in names:
                listed = ", ".join(([RECON] if has_recon else []) + names) or "none"
                raise InputError(f"no edit named {name!r} in {ws.path}; available: {listed}")
            elif not _edit_ready(ws, name):
                status = ws.group_attrs(f"edits/{name}").get("status", "unknown")
                raise InputError(f"edit {name!r} is not finished (status {status}); rerun `vd edit`")
            targets.append(name)
        return targets, skipped
    seams = "warp" in metrics and has_recon and _seam_pairs(ws, int(ws.array("video/frames").shape[0])) is not None
    targets = [RECON] if has_recon and (seams or any(m in GROUPS["fidelity"] for m in metrics)) else []
    for name in names:
        if _edit_ready(ws, name):
            targets.append(name)
        else:
            skipped[name] = f"not finished (status {ws.group_attrs(f'edits/{name}').get('status', 'unknown')})"
    if not targets and has_recon:
        raise InputError(f"nothing to evaluate in {ws.path}: the chosen metrics apply to edits and there is "
                         "no finished edit; run `vd edit` first")
    if not targets:
        raise InputError(f"nothing to evaluate in {ws.path}: no inversion/reconstruction and no finished "
                         "edit; run `vd invert` and `vd edit` first")
    return targets, skipped


def _edit_ready(ws: Workspace, name: str) -> bool:
    status = ws.group_attrs(f"edits/{name}").get("status", "done")
    return ws.has(f"edits/{name}/frames") and status == "done"


class _Clip:
    """Source frames, masks and (lazily) source optical flow of one workspace."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        if not ws.has("video/frames"):
            raise InputError(f"{ws.path} has no video/frames; create it with `vd mask CLIP`")
        if not ws.has("masks/edit"):
            raise InputError(f"{ws.path} has no masks/edit; run `vd mask` first")
        self.source = ws.read("video/frames")
        self.mask = ws.read("masks/edit").astype(bool)
        self.raw = ws.read("masks/raw").astype(bool) if ws.has("masks/raw") else self.mask
        if self.mask.shape != self.source.shape[:3] or self.raw.shape != self.source.shape[:3]:
            raise InputError(f"{ws.path}: masks {self.mask.shape} do not match video/frames {self.source.shape}")
        self._flows: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self.seam_pairs = _seam_pairs(ws, len(self.source))

    def frames(self, name: str) -> np.ndarray:
        key = "inversion/reconstruction" if name == RECON else f"edits/{name}/frames"
        frames = self.ws.read(key)
        if frames.shape != self.source.shape:
            raise InputError(f"{key} has shape {frames.shape} but video/frames is {self.source.shape}")
        return frames

    @property
    def flows(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Forward (f -> f+1) and backward (f+1 -> f) Farneback flows of the SOURCE video."""
        if self._flows is None:
            s = self.source
            fwd = [M.farneback_flow(s[f], s[f + 1]) for f in range(len(s) - 1)]
            bwd = [M.farneback_flow(s[f + 1], s[f]) for f in range(len(s) - 1)]
            self._flows = (fwd, bwd)
        return self._flows


def _seam_pairs(ws: Workspace, frames: int) -> list[int] | None:
    """Frame pairs (f, f+1), by f, that cross a window border of the inversion; None with one window."""
    from stages.method.windows import plan_windows

    spec = ws.group_attrs("inversion").get("windows") or {}
    if not spec or len(spec.get("spans") or []) < 2:
        return None
    windows = plan_windows(frames, int(spec["window"]), int(spec["overlap"]))
    pairs = set()
    for s, e in windows.spans:
        if s > 0:
            pairs.add(s - 1)  # entering a window
        if e < frames:
            pairs.add(e - 1)  # leaving one
    return sorted(pairs)


def seam_metrics(warp: list[float], seam_pairs: list[int] | None) -> dict[str, Any]:
    """Warp error on the frame pairs at window borders vs the pairs inside windows (empty with one window)."""
    if not seam_pairs:
        return {}
    inside = [v for f, v in enumerate(warp) if f not in seam_pairs]
    return {"warp_error_seam": clip_mean([warp[f] for f in seam_pairs if f < len(warp)]),
            "warp_error_inside": clip_mean(inside) if inside else None}


# ----------------------------------------------------------------------------- evaluation


def _fidelity(clip: _Clip, frames: np.ndarray, regions: dict[str, np.ndarray | None], metrics: list[str],
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


def _evaluate_edit(clip: _Clip, name: str, frames: np.ndarray, attrs: dict[str, Any], metrics: list[str],
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
    prompt = _target_prompt(attrs)
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
    info = {"kind": "edit", "prompt": prompt, "background": background,
            "region": "inside masks/raw (the object)" if background else "outside masks/edit"}
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
    targets, skipped = _select(ws, config, metrics)
    scorers = scorers or Scorers(config)
    clip = _Clip(ws)
    items: dict[str, Any] = {}
    with progress.task(f"eval {ws.path.name}", total=len(targets)) as advance:
        for name in targets:
            start = time.monotonic()
            frames = clip.frames(name)
            attrs = {} if name == RECON else ws.group_attrs(f"edits/{name}")
            fingerprint = digest(frames, clip.mask, clip.raw, _target_prompt(attrs),
                                  (attrs.get("params") or {}).get("background", False))
            settings = {"metrics": metrics, "weights": scorers.describe(), "farneback": M.FARNEBACK,
                        "occlusion": OCCLUSION, "fingerprint": fingerprint, "vd_version": __version__}
            stored = ws.group_attrs(f"eval/{name}") if reuse else {}
            if stored and _fresh(stored.get("settings", {}), settings):
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


def metric_of(key: str) -> str:
    """The selectable metric a result key belongs to (psnr_unedited -> psnr, clip_score -> clip)."""
    if key.startswith("vbench"):
        return "vbench"
    if key.startswith("warp"):
        return "warp"
    if key.startswith("clip"):
        return "clip"
    return key.split("_")[0]


def _fresh(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    return (stored.get("fingerprint") == current["fingerprint"]
            and set(current["metrics"]) <= set(stored.get("metrics", []))
            and stored.get("weights") == current["weights"])


# ----------------------------------------------------------------------------- many workspaces


def find_workspaces(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a workspace, or a folder whose direct subfolders include workspaces."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "zarr.json").is_file():
            found.append(path)
        elif path.is_dir():
            subs = sorted(p for p in path.iterdir() if (p / "zarr.json").is_file())
            if not subs:
                raise InputError(f"{path} is neither a vd workspace nor a folder of workspaces")
            found.extend(subs)
        else:
            raise InputError(f"workspace {path} not found")
    if not found:
        raise InputError("no workspaces given")
    return list(dict.fromkeys(found))


def compare(paths: Iterable[str | Path], config: EvalConfig, progress: Progress | None = None,
            force: bool = False) -> dict[str, Any]:
    """Evaluate (or reuse stored results of) many workspaces and average each metric over clips.

    Groups: "reconstruction", "all edits" (every edit of every clip), and one per edit name.
    """
    progress = progress or Progress(quiet=True)
    scorers = Scorers(config)
    workspaces = find_workspaces(paths)
    per_clip: dict[str, dict[str, Any]] = {}
    metrics: list[str] = parse_metrics(config.metrics)
    skipped: dict[str, str] = {}
    for path in workspaces:
        if not _has_results(Workspace.open(path)):
            # a clip not inverted yet must not sink a batch table; it is listed instead
            skipped[str(path)] = "no inversion/reconstruction and no finished edit yet"
            progress.log(f"skipping {path}: nothing to evaluate yet (run `vd invert` and `vd edit`)")
            continue
        res = run_eval(path, config, progress, scorers, reuse=not force)
        per_clip[str(path)] = {name: item["metrics"] for name, item in res["items"].items()}
    if not per_clip:
        raise InputError(f"nothing to evaluate in {len(workspaces)} workspace(s): none has an inversion or a "
                         "finished edit; run `vd invert` and `vd edit` first")
    result = {"clips": list(per_clip), "metrics": metrics, "groups": compare_groups(per_clip),
              "per_clip": per_clip}
    if skipped:
        result["skipped_clips"] = skipped
    return result


def compare_groups(per_clip: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The comparison table over clips ({clip: {name: metrics}}): the reconstruction, all edits together,
    then each edit name, each aggregated over the clips that have it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for clip_items in per_clip.values():
        for name, values in clip_items.items():
            if name != RECON:
                groups.setdefault("all edits", []).append(values)
            groups.setdefault(name, []).append(values)
    fixed = [g for g in (RECON, "all edits") if g in groups]
    order = fixed + sorted(g for g in groups if g not in fixed)
    return {g: aggregate(groups[g]) for g in order}


def _has_results(ws: Workspace) -> bool:
    """True when the workspace has a reconstruction or at least one finished edit."""
    return ws.has("inversion/reconstruction") or any(_edit_ready(ws, n) for n in edit_names(ws))


def aggregate(items: list[dict[str, Any]]) -> dict[str, Any]:
    keys = list(dict.fromkeys(k for item in items for k in item))
    means: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for key in keys:
        vals = [as_number(item.get(key)) for item in items]
        nums = [v for v in vals if v is not None]
        if nums:
            means[key], counts[key] = clip_mean(nums), len(nums)
        else:
            first = next((item[key] for item in items if isinstance(item.get(key), dict)), None)
            means[key], counts[key] = first if first is not None else float("nan"), 0
    return json_safe({"n": len(items), "metrics": means, "counts": counts})


# ----------------------------------------------------------------------------- plots (PIL only)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_chart(series: dict[str, list[float | None]], title: str, width: int = 720, height: int = 400) -> Any:
    """A PNG-ready PIL line chart: x = frame index, one line per series; non-finite points leave gaps."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, width - 20, 36, height - 40
    draw.text((left, 10), title, fill="black", font=font)
    finite = [v for vals in series.values() for v in vals if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) + 1e-3), hi + 0.5 * (abs(hi) + 1e-3)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = max((len(v) for v in series.values()), default=1)
    xmax = max(n - 1, 1)

    def px(i: float, v: float) -> tuple[float, float]:
        return left + (right - left) * i / xmax, bottom - (bottom - top) * (v - lo) / (hi - lo)

    draw.rectangle((left, top, right, bottom), outline="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = px(0, v)[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 6), f"{v:.4g}", fill="black", font=font)
    step = max(1, n // 16)
    for i in range(0, n, step):
        x = px(i, lo)[0]
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 3, bottom + 6), str(i), fill="black", font=font)
    draw.text(((left + right) // 2 - 15, height - 16), "frame", fill="black", font=font)
    lines: list[tuple[str, tuple[int, int, int]]] = []
    for idx, (name, vals) in enumerate(series.items()):
        color = PALETTE[idx % len(PALETTE)]
        lines.append((name, color))
        run: list[tuple[float, float]] = []
        for i, v in enumerate(list(vals) + [None]):
            if v is not None and math.isfinite(v):
                run.append(px(i, v))
                continue
            if len(run) > 1:
                draw.line(run, fill=color, width=2)
            for p in run:
                draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=color)
            run = []
    # legend last, on a white box, so lines never hide it
    draw.rectangle((right - 156, top + 4, right - 4, top + 10 + 14 * len(lines)), fill="white", outline="gray")
    for idx, (name, color) in enumerate(lines):
        ly = top + 6 + 14 * idx
        draw.line((right - 150, ly + 6, right - 130, ly + 6), fill=color, width=3)
        draw.text((right - 125, ly), name[:20], fill="black", font=font)
    return img


def write_plots(ws: Workspace, items: dict[str, Any]) -> list[str]:
    """One PNG per per-frame metric under eval/plots/, each comparing every evaluated item."""
    by_metric: dict[str, dict[str, list[float | None]]] = {}
    for name, item in items.items():
        for key, vals in item.get("per_frame", {}).items():
            by_metric.setdefault(key, {})[name] = [as_number(v) for v in vals]
    written = []
    for key, series in by_metric.items():
        rel = f"eval/plots/{key}.png"
        with ws.atomic_file(rel) as tmp:
            line_chart(series, f"{key} per frame").save(tmp, format="PNG")
        written.append(rel)
    return written
