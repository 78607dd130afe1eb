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
config, settings, config_hash, run (a new id per inversion made), and when done: recon metrics, timings, counts,
summary.

Freshness (docs/concepts/freshness.md): `settings` hold what the stored steps read, by content: the settings that
change them, the digests of the frames and (when STDG or --store-components reads it) masks/edit, and the
model's content identity (never its path). `subject` and the model's path are labels only later stages use: a
rerun that changes them updates them (`relabel`) and keeps the inversion. Edits record `inversion_id`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.common.config import changed_settings, config_dict, config_hash
from stages.common.digest import digest
from stages.common.errors import InputError, VdError, first_line
from stages.invert.config import GROUP, STAT_COLUMNS, InvertConfig
from stages.invert.nulltext import _expand
from stages.io.reads import Reads, describe_changed
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

# stored settings that are digests of workspace arrays, and the arrays they are of
READS = {"frames": "video/frames", "masks": "masks/edit"}


def _settings(cfg: InvertConfig) -> dict[str, Any]:
    """Settings the stored steps depend on (the model by content: stored_settings adds its identity)."""
    return {"prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt,
            "steps": int(cfg.steps), "cfg": float(cfg.cfg), "method": cfg.method,
            "null_steps": int(cfg.null_steps) if cfg.method == "null-text" else 0,
            "stdg": list(cfg.coefficients()), "region": cfg.region, "shared_null": bool(cfg.shared_null),
            "schedule": cfg.schedule, "seed": int(cfg.seed), "per_frame_groupnorm": bool(cfg.per_frame_groupnorm),
            "store_components": bool(cfg.store_components), "plain": bool(cfg.plain),
            "window": int(cfg.window), "overlap": int(cfg.overlap)}


def _digest(data: np.ndarray | None) -> str | None:
    return None if data is None else digest(data)


def reads_mask(cfg: InvertConfig) -> bool:
    """Whether the inversion reads masks/edit (STDG on, or --store-components)."""
    return any(cfg.coefficients()) or bool(cfg.store_components)


def stored_settings(cfg: InvertConfig, frames: np.ndarray, mask: np.ndarray | None,
                    identity: str | None = None) -> dict[str, Any]:
    """What a stored inversion depends on: the settings, the digests of the frames and of the mask when the
    inversion reads it, and the model's content identity (`identity`, when known). A resume (or `vd batch`'s
    skip) needs these to be equal."""
    settings = _settings(cfg)
    settings.update(frames=_digest(frames), masks=_digest(mask) if reads_mask(cfg) else None)
    if identity is not None:
        settings["model_fingerprint"] = identity
    return settings


def model_identity(cfg: InvertConfig, models: Any = None) -> str:
    """The content identity of cfg's model: the loaded one's, else found from its files without loading."""
    if models is not None:
        return str(models.fingerprint)
    from stages.models.resolve import model_identity as identity_of

    return identity_of(cfg.model)


def _model_change(stored: dict[str, Any], new_spec: str | None, new: Any, ws: Workspace) -> str:
    """The refusal for an inversion made with another model (by content)."""
    from stages.models.identity import is_legacy, legacy_message

    old = stored["settings"].get("model_fingerprint")
    if is_legacy(old):
        return legacy_message(str(old), str(ws.path))
    spec = (stored.get("model") or {}).get("spec") or (stored.get("config") or {}).get("model")
    if new_spec is not None and spec is not None and spec != new_spec:
        return (f"the inversion in {ws.path} was made with other settings (model {spec!r} -> {new_spec!r}); "
                f"rerun with the same settings to resume, or pass --restart to discard it")
    return (f"the inversion in {ws.path} was made with another model: the content of {spec!r} changed "
            f"({old} -> {new}); pass --restart to invert again with it")


def _settings_change(stored: dict[str, Any], settings: dict[str, Any], ws: Workspace,
                     spec: str | None = None) -> str:
    """"" when the stored inversion (group attrs `stored`) was made with `settings` (the keys both have),
    else the one-line refusal naming what changed; `spec` is the model asked for (to name it)."""
    # inversions made before --method existed are null-text ones
    old = {k: v for k, v in {"method": "null-text", **stored["settings"]}.items() if k in settings}
    changed = [k for k in changed_settings(old, settings) if k in settings]
    if not changed:
        return ""
    if "model_fingerprint" in changed:
        return _model_change(stored, spec, settings["model_fingerprint"], ws)
    if "frames" in changed or "masks" in changed:
        names = [READS[k] for k in READS if k in changed]
        return (f"the inversion in {ws.path} is stale: {describe_changed(names)}; "
                f"pass --restart to invert again")

    def show(k: str) -> str:
        a, b = old.get(k), settings.get(k)
        return f"{k} {a!r} -> {b!r}" if len(repr(a)) + len(repr(b)) < 60 else k

    listed = "; ".join(show(k) for k in changed)
    return (f"the inversion in {ws.path} was made with other settings ({listed}); "
            f"rerun with the same settings to resume, or pass --restart to discard it")


def _refuse_changes(stored: dict[str, Any], settings: dict[str, Any], ws: Workspace, spec: str | None = None) -> None:
    """InputError when the stored inversion was made with other settings (see _settings_change)."""
    why = _settings_change(stored, settings, ws, spec)
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


def _relabels(stored: dict[str, Any], cfg: InvertConfig) -> dict[str, tuple[Any, Any]]:
    """Labels of the stored inversion that cfg changes without changing the inversion: the subject (only
    `vd edit` reads it) and the model's path (the same content elsewhere). {name: (old, new)}."""
    changes: dict[str, tuple[Any, Any]] = {}
    if stored.get("subject") != cfg.subject:
        changes["subject"] = (stored.get("subject"), cfg.subject)
    spec = (stored.get("model") or {}).get("spec")
    if spec != cfg.model:
        changes["model"] = (spec, cfg.model)
    return changes


def _show_relabels(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


def relabel(ws: Workspace, cfg: InvertConfig, stored: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    """Store cfg's subject and model path on the stored inversion when they differ (nothing is recomputed:
    edits whose prompt replaced the old subject become stale through it); returns the updated attrs."""
    changes = _relabels(stored, cfg)
    if not changes:
        return stored
    config = dict(stored.get("config") or {})
    config.update(subject=cfg.subject, model=cfg.model)
    ws.update_attrs(GROUP, subject=cfg.subject, model={**(stored.get("model") or {}), "spec": cfg.model},
                    config=config)
    if progress is not None:
        progress.log(f"inversion in {ws.path}: {_show_relabels(changes)} (the inversion itself is unchanged)")
    return ws.group_attrs(GROUP)


def _require_inputs(ws: Workspace, cfg: InvertConfig) -> tuple[np.ndarray, np.ndarray | None]:
    if not ws.has("video/frames"):
        raise InputError(f"workspace {ws.path} has no video/frames; create it with `vd mask CLIP`")
    frames = ws.read("video/frames")
    mask = ws.read("masks/edit") if ws.has("masks/edit") else None
    if mask is None and reads_mask(cfg):
        raise InputError(f"workspace {ws.path} has no masks/edit (STDG needs the subject mask): run `vd mask` "
                         f"first, or pass --no-stdg")
    if mask is not None and mask.shape != frames.shape[:3]:
        raise InputError(f"masks/edit has shape {mask.shape} but the frames are {frames.shape[:3]}")
    return frames, mask


def is_current(ws: Workspace, cfg: InvertConfig, identity: str | None = None) -> tuple[bool, str]:
    """Whether run_invert(ws, cfg) would find the inversion complete and change nothing: (True, "") or
    (False, why).

    The same rule run_invert applies before loading a model: inputs, settings incl. the frame and mask
    digests and the model's content identity (`identity`, else found from the model's files), completion,
    then the labels (subject, model path) run_invert would update. The dtype is only checked once run_invert
    has loaded the model. Reads only: no lock, no model. A config that cannot work raises UsageError.
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
    if identity is None:
        try:
            identity = model_identity(cfg)
        except VdError as exc:
            return False, first_line(exc)
    why = (_settings_change(stored, stored_settings(cfg, frames, mask, identity), ws, cfg.model)
           or _incomplete(ws, cfg, stored))
    if not why and _relabels(stored, cfg):
        why = f"{_show_relabels(_relabels(stored, cfg))} (stored without redoing the inversion)"
    return not why, why


def only_relabels(ws: Workspace, cfg: InvertConfig, identity: str) -> bool:
    """Whether the stored inversion is complete for cfg and differs from it only in labels (relabel)."""
    stored = ws.group_attrs(GROUP)
    if cfg.restart or not stored.get("settings") or not _relabels(stored, cfg):
        return False
    try:
        frames, mask = _require_inputs(ws, cfg)
    except InputError:
        return False
    return not (_settings_change(stored, stored_settings(cfg, frames, mask, identity), ws, cfg.model)
                or _incomplete(ws, cfg, stored))


# ------------------------------------------------------------------------------- what later stages check

def inversion_id(attrs: dict[str, Any]) -> str | None:
    """The identity of the inversion stored with group attrs `attrs`, as edits record it: its settings'
    hash plus the id of the run that made it (a --restart makes a new one). None without an inversion."""
    made = attrs.get("config_hash")
    run = attrs.get("run")
    return f"{made}-{run}" if made and run else made


def inputs_changed(ws: Workspace, attrs: dict[str, Any] | None = None, reads: Reads | None = None) -> str:
    """"" when the arrays the stored inversion read (frames, and masks/edit when it read them) are unchanged,
    else why it is stale. Reads only; `reads` shares digests with other checks of the same workspace."""
    attrs = ws.group_attrs(GROUP) if attrs is None else attrs
    settings = attrs.get("settings") or {}
    recorded = {READS[k]: settings[k] for k in READS if settings.get(k) is not None}
    changed = (reads or Reads(ws)).changed(recorded)
    return describe_changed(changed) if changed else ""


def stale_fix(ws: Workspace) -> str:
    """The command that makes a stale inversion current again."""
    return f"rerun `vd invert {ws.path} --restart`"


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
                        run=uuid.uuid4().hex[:12], windows=windows.describe())


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
