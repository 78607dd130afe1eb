"""The workspace's inversion group: what run_invert stores, how a rerun is checked against it, and reading it.

Workspace (see notes/interfaces.md; S steps, F frames):
  inversion/latents            f32 (S+1, F, 4, h, w)  [0] = z0 (VAE sample), [k] = z* at timesteps[S-k]
  inversion/recon_latents      f32 (S+1, F, 4, h, w)  same indexing: [S] = z*_T, step i writes [S-1-i]
  inversion/null_embeddings    f32 (S, F, 77, D)      phi_i per frame (repeated per frame with shared_null)
  inversion/stdg/guidance      f32 (S, F, 4, h, w)    G_i (zeros where skipped; all zeros for method direct)
  inversion/direct_offsets     f32 (S, F, 4, h, w)    method direct only: z*_{t-1} - step(z*_t) of step i
  inversion/stdg/components    f32 (S, 4, F, 4, h, w) [T_fg, T_bg, K_fg, K_bg] gradients (store_components)
  inversion/targets/temporal/<layer>/value f16 (S, HW, heads, F), .../index u8 (S, HW, heads, F)
  inversion/targets/keys/<layer>           f32 (S, 2, F, C)  [fg, bg] masked-mean keys (zeros where skipped)
  inversion/step_stats         f64 (S, 7)  [inner iterations, first and last null-text loss (before the
                                            update), forwards, GT forwards, backwards, seconds]
  inversion/done               bool (S+1,) [i] = step i committed (data first), [S] = report written
  inversion/reconstruction     u8 (F, H, W, 3); reconstruction.mp4, preview.gif (source | reconstruction)
Group attrs: status, model {spec, fingerprint}, prompt, negative_prompt, subject, region ("foreground" |
"background"), method, stdg (coefficients), cfg, shared_null, schedule, timesteps, prev, edit_timesteps, edit_prev,
config, settings, config_hash, and when done: recon metrics, timings, counts, summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.common.config import changed_settings, config_dict, config_hash
from stages.common.digest import digest
from stages.common.errors import InputError
from stages.invert.config import GROUP, STAT_COLUMNS, InvertConfig
from stages.invert.nulltext import _expand
from stages.io.workspace import Workspace


@dataclass
class Inversion:
    """A finished inversion as the edit stage needs it (arrays are float32 numpy)."""

    schedule: Any  # stages.method.ddim.Schedule
    latents: np.ndarray  # (S+1, F, 4, h, w), [S - i] is z*_{t_i}
    null_embeddings: np.ndarray  # (S, F, 77, D)
    guidance: np.ndarray  # (S, F, 4, h, w)
    prompt: str
    negative_prompt: str
    subject: str | None
    region: str
    cfg: float
    shared_null: bool
    model: dict[str, Any]  # {spec, fingerprint}
    attrs: dict[str, Any] = field(default_factory=dict)
    offsets: np.ndarray | None = None  # (S, F, 4, h, w) direct inversion's offsets (method "direct" only)

    @property
    def method(self) -> str:
        """How the inversion was made: null-text, direct or negative-prompt (stages/invert/direct.py)."""
        return str(self.attrs.get("method") or "null-text")

    @property
    def steps(self) -> int:
        return int(self.null_embeddings.shape[0])

    @property
    def frames(self) -> int:
        return int(self.latents.shape[1])


def load_inversion(ws: Workspace) -> Inversion:
    """Read a finished inversion; InputError when the workspace has none (or an unfinished one)."""
    from stages.method.ddim import make_schedule

    attrs = ws.group_attrs(GROUP)
    if not attrs or not ws.has(f"{GROUP}/done") or not ws.has(f"{GROUP}/latents"):
        raise InputError(f"workspace {ws.path} has no inversion; run `vd invert {ws.path} --prompt ...` first")
    steps = int(attrs["steps"])
    if not bool(np.all(ws.read(f"{GROUP}/done")[:steps])):
        raise InputError(f"the inversion in {ws.path} is unfinished; rerun `vd invert {ws.path}` to complete it")
    return Inversion(
        schedule=make_schedule(attrs["schedule"], steps),
        latents=ws.read(f"{GROUP}/latents"),
        null_embeddings=ws.read(f"{GROUP}/null_embeddings"),
        guidance=ws.read(f"{GROUP}/stdg/guidance"),
        prompt=attrs["prompt"], negative_prompt=attrs.get("negative_prompt", ""), subject=attrs.get("subject"),
        region=attrs.get("region", "foreground"), cfg=float(attrs["cfg"]),
        shared_null=bool(attrs.get("shared_null", False)), model=dict(attrs.get("model", {})), attrs=attrs,
        offsets=(ws.read(f"{GROUP}/direct_offsets")
                 if attrs.get("method") == "direct" and ws.has(f"{GROUP}/direct_offsets") else None),
    )


# ------------------------------------------------------------------------------- settings and reruns

def _settings(cfg: InvertConfig) -> dict[str, Any]:
    """Settings the stored steps depend on (before the model is loaded)."""
    return {"model": cfg.model, "prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt,
            "steps": int(cfg.steps), "cfg": float(cfg.cfg), "method": cfg.method,
            "null_steps": int(cfg.null_steps) if cfg.method == "null-text" else 0,
            "stdg": list(cfg.coefficients()), "region": cfg.region, "shared_null": bool(cfg.shared_null),
            "schedule": cfg.schedule, "seed": int(cfg.seed), "per_frame_groupnorm": bool(cfg.per_frame_groupnorm),
            "store_components": bool(cfg.store_components), "plain": bool(cfg.plain),
            "window": int(cfg.window), "overlap": int(cfg.overlap)}


def _digest(data: np.ndarray | None) -> str | None:
    return None if data is None else digest(data)


def stored_settings(cfg: InvertConfig, frames: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
    """What a stored inversion depends on (before the model is loaded): the settings plus digests of the
    frames and, when STDG uses it, the mask. A resume (or `vd batch`'s skip) needs these to be equal."""
    settings = _settings(cfg)
    settings.update(frames=_digest(frames), masks=_digest(mask) if any(cfg.coefficients()) else None)
    return settings


def _settings_change(stored: dict[str, Any], settings: dict[str, Any], ws: Workspace) -> str:
    """"" when the stored inversion (group attrs `stored`) was made with `settings` (the keys both have),
    else the one-line refusal naming what changed."""
    # inversions made before --method existed are null-text ones
    old = {k: v for k, v in {"method": "null-text", **stored["settings"]}.items() if k in settings}
    changed = [k for k in changed_settings(old, settings) if k in settings]
    if not changed:
        return ""

    def show(k: str) -> str:
        a, b = old.get(k), settings.get(k)
        return f"{k} {a!r} -> {b!r}" if len(repr(a)) + len(repr(b)) < 60 else k

    listed = "; ".join(show(k) for k in changed)
    return (f"the inversion in {ws.path} was made with other settings ({listed}); "
            f"rerun with the same settings to resume, or pass --restart to discard it")


def _refuse_changes(stored: dict[str, Any], settings: dict[str, Any], ws: Workspace) -> None:
    """InputError when the stored inversion was made with other settings (see _settings_change)."""
    why = _settings_change(stored, settings, ws)
    if why:
        raise InputError(why)


def _incomplete(ws: Workspace, cfg: InvertConfig, stored: dict[str, Any]) -> str:
    """"" when the stored inversion (same settings) has nothing left to do for cfg, else why not."""
    done = ws.read(f"{GROUP}/done") if ws.has(f"{GROUP}/done") else None
    if done is None or not bool(done.all()) or stored.get("status") != "done":
        return f"the inversion in {ws.path} is unfinished"
    if cfg.compare_ddim and "ddim_psnr" not in (stored.get("recon") or {}):
        return f"the inversion in {ws.path} has no plain DDIM comparison (--compare-ddim)"
    return ""


def _require_inputs(ws: Workspace, cfg: InvertConfig) -> tuple[np.ndarray, np.ndarray | None]:
    if not ws.has("video/frames"):
        raise InputError(f"workspace {ws.path} has no video/frames; create it with `vd mask CLIP`")
    frames = ws.read("video/frames")
    mask = ws.read("masks/edit") if ws.has("masks/edit") else None
    if mask is None and any(c != 0 for c in cfg.coefficients()):
        raise InputError(f"workspace {ws.path} has no masks/edit (STDG needs the subject mask): run `vd mask` "
                         f"first, or pass --no-stdg")
    if mask is not None and mask.shape != frames.shape[:3]:
        raise InputError(f"masks/edit has shape {mask.shape} but the frames are {frames.shape[:3]}")
    return frames, mask


def is_current(ws: Workspace, cfg: InvertConfig) -> tuple[bool, str]:
    """Whether run_invert(ws, cfg) would find the inversion complete and skip it: (True, "") or (False, why).

    The same rule run_invert applies before loading a model (inputs, settings incl. frame/mask digests,
    completion); the model's fingerprint and dtype are only checked once run_invert has loaded it.
    Reads only: no lock, no model. A config that cannot work raises UsageError (cfg.coefficients()).
    """
    try:
        frames, mask = _require_inputs(ws, cfg)
    except InputError as exc:
        return False, str(exc)
    stored = ws.group_attrs(GROUP)
    if not stored.get("settings"):
        return False, f"workspace {ws.path} has no inversion"
    if cfg.restart:
        return False, "--restart discards the stored inversion"
    why = _settings_change(stored, stored_settings(cfg, frames, mask), ws) or _incomplete(ws, cfg, stored)
    return not why, why


def _summary_from_attrs(ws: Workspace) -> dict[str, Any]:
    summary = dict(ws.group_attrs(GROUP).get("summary") or {})
    summary.update(already_done=True, resumed_from=summary.get("steps"))
    return summary


# ------------------------------------------------------------------------------- writing a run

def _begin(ws: Workspace, cfg: InvertConfig, models: Any, schedule: Any, coef: tuple[float, ...],
           settings: dict[str, Any], windows: Any) -> None:
    """The group attrs of a new inversion (a resumed one keeps its own)."""
    S = schedule.steps
    if not ws.group_attrs(GROUP).get("settings"):
        ws.update_attrs(GROUP, status="running", model={"spec": cfg.model, "fingerprint": models.fingerprint},
                        method=cfg.method, prompt=cfg.prompt, negative_prompt=cfg.negative_prompt,
                        subject=cfg.subject, region=cfg.region, stdg=list(coef), cfg=float(cfg.cfg),
                        shared_null=bool(cfg.shared_null),
                        schedule=schedule.name, steps=S, timesteps=list(schedule.timesteps), prev=list(schedule.prev),
                        edit_timesteps=list(schedule.edit_timesteps), edit_prev=list(schedule.edit_prev),
                        config=config_dict(cfg), settings=settings, config_hash=config_hash(settings),
                        windows=windows.describe())


def _open_arrays(ws: Workspace, S: int, F: int, D: int, shape: tuple[int, ...],
                 store_components: bool) -> dict[str, Any]:
    """The per-step arrays (opened, or created when missing) that the steps fill in."""
    arrays = {
        "recon": ws.create_array(f"{GROUP}/recon_latents", (S + 1,) + shape, "float32", (1,) + shape),
        "null": ws.create_array(f"{GROUP}/null_embeddings", (S, F, 77, D), "float32", (1, F, 77, D)),
        "guidance": ws.create_array(f"{GROUP}/stdg/guidance", (S,) + shape, "float32", (1,) + shape),
        "stats": ws.create_array(f"{GROUP}/step_stats", (S, len(STAT_COLUMNS)), "float64", (1, len(STAT_COLUMNS))),
        "done": ws.create_array(f"{GROUP}/done", (S + 1,), "bool", (1,)),
    }
    if store_components:
        arrays["components"] = ws.create_array(f"{GROUP}/stdg/components", (S, 4) + shape, "float32",
                                               (1, 4) + shape)
    return arrays


def _step_array(ws: Workspace, arrays: dict[str, Any], name: str, S: int, shape: Any, dtype: str) -> Any:
    """The (S, *shape) per-step array `name`, opened (or created) once per run, not once per step."""
    if name not in arrays:
        shape = tuple(shape)
        arrays[name] = ws.create_array(name, (S,) + shape, dtype, (1,) + shape)
    return arrays[name]


def _commit(ws: Workspace, arrays: dict[str, Any], i: int, S: int, z_next: Any, phi: Any,
            record: dict[str, Any], F: int) -> None:
    """Write step i's data (the done flag is set by the caller afterwards)."""
    from stages.method.guidance import COMPONENTS

    targets = record.get("targets")
    # one window: inversion/targets/...; several: inversion/targets/w<k>/... (maps exist per window)
    per_window = targets if isinstance(targets, list) else [targets] if targets is not None else []
    for k, targets in enumerate(per_window):
        root = f"{GROUP}/targets/w{k}" if isinstance(record.get("targets"), list) else f"{GROUP}/targets"
        for name, (value, index) in targets.temporal.items():
            base = f"{root}/temporal/{name}"
            _step_array(ws, arrays, f"{base}/value", S, value.shape, "float16")[i] = \
                value.cpu().numpy().astype(np.float16)
            _step_array(ws, arrays, f"{base}/index", S, index.shape, "uint8")[i] = \
                index.cpu().numpy().astype(np.uint8)
        for name, keys in targets.keys.items():
            _step_array(ws, arrays, f"{root}/keys/{name}", S, keys.shape, "float32")[i] = \
                keys.cpu().numpy().astype(np.float32)
    arrays["guidance"][i] = record["G"][0].float().cpu().numpy()
    if "components" in arrays and record.get("components") is not None:
        comps = record["components"]
        arrays["components"][i] = np.stack([comps[n][0].float().cpu().numpy() for n in COMPONENTS])
    arrays["null"][i] = _expand(phi, F).float().cpu().numpy()
    arrays["recon"][S - 1 - i] = z_next[0].float().cpu().numpy()
