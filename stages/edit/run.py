"""Stage `vd edit`: VideoDirector editing from a finished inversion (ALGORITHM.md §5).

Per sampling step i one UNet call runs four slots [edit-uncond(phi_i), edit-cond(target),
recon-uncond(negative prompt), recon-cond(source)] (§5.1); the recon slots get the stored inversion latent
z*_{t_i} = latents[S - i]. Attention edits (stages.method.control.editing): P2P refine/swap + reweight for
steps < int(tau_c (S + 1)), SA-I for steps < int(S tau_s), SA-II after. The edit latent is updated with
CFG (the inversion's scale) and the stored STDG gradient G_i (§3.7). Outputs go to edits/<name>/.
The sampling loop is stages.edit.sampling; per-region edits (--region) are stages.edit.regions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from stages import __version__

from stages.io import locks as stagelock
from stages.common.config import config_dict
from stages.method.control.editing import BLEND_BLOCKS, SA1_MAX_TOKENS, SA2_BLOCKS
from stages.method.control.layout import LAYOUT_STEPS, LAYOUT_STRENGTH
from stages.common.errors import InputError, Interrupted, UsageError
from stages.invert import Inversion
from stages.common.progress import Progress
from stages.method.prompts import changed_words, resolve_prompt, slug, words
from stages.io.workspace import Workspace, check_name
from stages.edit.regions import RegionPlan, object_arrays, object_names, plan_regions, validate_regions
from stages.edit.sampling import edit_latents
from stages.models.oom import oom_answered


# eval/<name> holds an edit's scores; these names are eval's own (the inversion's scores, the charts)
RESERVED_NAMES = frozenset({"reconstruction", "plots"})


@dataclass
class EditConfig:
    """Settings of one edit (stored in full as edits/<name> attrs `params`)."""

    prompt: str = ""
    name: str | None = None
    reweight: dict[str, float] = field(default_factory=dict)  # word (or phrase) -> attention weight
    tau_s: float = 0.4  # SA-I for steps < int(S tau_s), SA-II from there on
    tau_c: float = 0.8  # P2P for steps < int(tau_c (S + 1))
    background: bool = False  # edit the background: SA-II hides the source background instead
    blend: list[str] = field(default_factory=list, metadata={"words": True})  # local-blend words (off when empty)
    blend_threshold: float = 0.3
    blend_start: float = 0.2  # blend from step int(blend_start S)
    sa1: bool = True
    sa2: bool = True
    cross: bool = True
    stdg: bool = True
    cross_mode: str = "auto"  # auto (swap when token counts match, else refine) | refine | swap
    sa1_max_tokens: int = SA1_MAX_TOKENS  # SA-I in self-attention layers with at most this many tokens
    sa1_blocks: list[str] = field(default_factory=list)  # explicit override of the token rule (block names)
    sa2_blocks: list[str] = field(default_factory=lambda: list(SA2_BLOCKS))
    blend_blocks: list[str] = field(default_factory=lambda: list(BLEND_BLOCKS))
    regions: dict[str, str] = field(default_factory=dict)  # object name -> target phrase (docs/concepts/extensions.md)
    objects: dict[str, str] = field(default_factory=dict)  # object name -> source phrase (overrides vd mask's)
    layout_steps: float = LAYOUT_STEPS  # regions: VideoGrain's layout modulation for steps < int(S layout_steps)
    layout_strength: float = LAYOUT_STRENGTH  # multiplier of its lambdas (1.0 cross, 0.3 self)
    region_blend: bool = True  # regions: local blend per edited object from its own phrase
    first_frame: str | None = None  # edited first frame (image path): SparseCtrl RGB on the target branch
    first_frame_scale: float = 1.0  # SparseCtrl conditioning scale S
    first_frame_steps: int | None = None  # SparseCtrl for steps < K (None: every step)
    output: str | None = None  # extra copy of the mp4
    force: bool = False
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class EditJob:
    """One planned edit: its config, name, resolved target prompt, mode and changed words."""

    cfg: EditConfig
    name: str
    target: str
    mode: str
    words: list[str]
    regions: RegionPlan | None = None  # per-region edit (mode "regions")
    first_frame: Any = None  # stages.edit.first_frame.FirstFrame (--first-frame)


# ----------------------------------------------------------------------------------------- inputs
def load_inversion_for_edit(ws: Workspace) -> Inversion:
    """The workspace's finished inversion (stages.invert.load_inversion), checked for what editing needs."""
    from stages.invert import load_inversion

    inv = load_inversion(ws)
    if inv.attrs.get("status") != "done":
        raise InputError(f"the inversion in {ws.path} is not finished (status {inv.attrs.get('status')!r}); "
                         f"rerun `vd invert {ws.path}` to complete it")
    shape = inv.latents.shape
    if inv.null_embeddings.shape[:2] != (inv.steps, shape[1]) or inv.guidance.shape != (inv.steps,) + shape[1:] \
            or shape[0] != inv.steps + 1:
        raise InputError(f"the inversion arrays in {ws.path} have inconsistent shapes; re-invert with --restart")
    from stages.edit.offsets import check_offsets

    check_offsets(inv, ws.path)  # a direct inversion's offsets
    from stages.invert.store import inputs_changed, stale_fix

    why = inputs_changed(ws, inv.attrs)  # frames or masks it read replaced since (`vd mask` rerun)
    if why:
        raise InputError(f"the inversion in {ws.path} is stale: {why}; {stale_fix(ws)}")
    return inv


def _check_region(ws: Workspace, inv: Inversion, cfg: EditConfig, progress: Progress) -> None:
    region = inv.region or "foreground"
    if cfg.background and region != "background":
        raise InputError(f"--background needs an inversion with the background STDG coefficients (this one is "
                         f"{region!r}); re-invert with `vd invert {ws.path} --preset background --restart ...`")
    if not cfg.background and region == "background":
        progress.log("note: this inversion used the background STDG coefficients; pass --background to edit the "
                     "background")


def validate_edit(cfg: EditConfig) -> None:
    from stages.common.config import check_config

    if isinstance(cfg.blend, str):  # presets may give "bear tiger"
        cfg.blend = cfg.blend.replace(",", " ").split()
    check_config(cfg)  # types and finite numbers (e.g. --reweight blue=nan)
    bad = {w: c for w, c in cfg.reweight.items() if abs(c) > 100}
    if bad:
        raise UsageError(f"--reweight weights must lie in [-100, 100], got {bad}")
    if not 0.0 <= cfg.blend_start <= 1.0:
        raise UsageError(f"blend start must lie in [0, 1], got {cfg.blend_start}")
    if not 0.0 <= cfg.tau_s <= 1.0 or not 0.0 <= cfg.tau_c <= 1.0:
        raise UsageError(f"--tau-s and --tau-c must lie in [0, 1] (got {cfg.tau_s}, {cfg.tau_c})")
    if not 0.0 < cfg.blend_threshold < 1.0:
        raise UsageError(f"blend threshold must lie in (0, 1), got {cfg.blend_threshold}")
    if cfg.cross_mode not in ("auto", "refine", "swap"):
        raise UsageError(f"unknown cross-attention mode {cfg.cross_mode!r}; choose auto, refine or swap")
    validate_regions(cfg)
    from stages.edit.first_frame import check_settings

    check_settings(cfg)


def _check_output(output: str | None) -> None:
    """Refuse an `-o` target that cannot become a file, before any model work is spent."""
    if not output:
        return
    path = Path(output)
    if path.is_dir() or str(output).endswith(("/", "\\")):
        raise UsageError(f"-o {output} is a directory; give a file name such as {path / 'edit.mp4'}")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"-o {output}: {parent} is not a directory")


def _contains(text: str, phrase: str) -> bool:
    want, have = words(phrase), words(text)
    return bool(want) and any(have[k:k + len(want)] == want for k in range(len(have) - len(want) + 1))


def plan_edit(ws: Workspace, inv: Inversion, cfg: EditConfig) -> EditJob:
    """Resolve prompt, name and words; every check that needs no model."""
    validate_edit(cfg)
    regions = plan_regions(ws, inv.prompt, cfg.regions, cfg.objects) if cfg.regions else None
    if regions is None and cfg.first_frame and not cfg.prompt.strip():  # --first-frame alone: the source prompt
        target, mode = inv.prompt, "first-frame"
    else:
        target, mode = (regions.target, "regions") if regions else resolve_prompt(cfg.prompt, inv.prompt,
                                                                                  inv.subject)
    for word in cfg.reweight:
        if not _contains(target, word):
            raise InputError(f"reweight word {word!r} is not in the target prompt {target!r}")
    for word in cfg.blend:
        if not (_contains(target, word) or _contains(inv.prompt, word)):
            raise InputError(f"blend word {word!r} is in neither the target nor the source prompt")
    changed = changed_words(inv.prompt, target)
    reweighted = [w for w in cfg.reweight if " ".join(words(w)) not in changed]
    name = check_name(cfg.name or slug(changed or list(cfg.reweight), default="first-frame" if cfg.first_frame
                                        else "edit"))
    if "/" in name:
        raise InputError(f"invalid edit name {name!r}: no '/'")
    if name in RESERVED_NAMES:
        raise InputError(f"edit name {name!r} is reserved (vd eval stores eval/{name} for its own use); "
                         f"choose another with --name")
    _check_output(cfg.output)
    existing = ws.group_attrs(f"edits/{name}")
    if existing and existing.get("status") == "done" and not cfg.force:
        raise InputError(f"edit {name!r} already exists in {ws.path}; pass --force to replace it or --name NEW")
    from stages.edit.first_frame import plan_first_frame

    first = plan_first_frame(ws, cfg)  # reads and maps the image (exit 3 when it cannot be used)
    return EditJob(cfg, name, target, mode, changed + reweighted, regions, first)


# ----------------------------------------------------------------------------------------- what it read
def edit_reads(job: EditJob) -> list[str]:
    """The workspace arrays an edit reads besides the inversion (stages.edit.sampling, regions, outputs)."""
    if job.regions is not None:
        return ["video/frames", *object_arrays(job.regions.names)]
    return ["video/frames", "masks/edit"] if job.cfg.sa2 else ["video/frames"]


def read_record(ws: Workspace, inv: Inversion, job: EditJob) -> dict[str, Any]:
    """The edit attrs that say what it read (what stages.edit.fresh compares): the inversion's identity,
    the digests of the arrays it reads, and the subject its prompt replaced (None when it replaced none)."""
    from stages.invert.store import inversion_id
    from stages.io.reads import Reads

    return {"inversion": inversion_id(inv.attrs), "reads": Reads(ws).of(edit_reads(job)),
            "subject": inv.subject if job.mode == "phrase" else None}


# ----------------------------------------------------------------------------------------- outputs
def _write_outputs(ws: Workspace, inv: Inversion, job: EditJob, frames: np.ndarray) -> dict[str, str]:
    from stages.io.video import side_by_side, write_gif, write_mp4

    base = f"edits/{job.name}"
    ws.write_array(f"{base}/frames", frames)
    fps = float((ws.attrs.get("source") or {}).get("fps_out") or 8.0)
    outputs = {"frames": str(ws.file_path(f"{base}/frames")),
               "mp4": str(write_mp4(ws.file_path(f"{base}/edit.mp4"), frames, fps))}
    panels, labels = [np.asarray(ws.read("video/frames"))], ["source"]
    if ws.has("inversion/reconstruction"):
        panels.append(np.asarray(ws.read("inversion/reconstruction")))
        labels.append("reconstruction")
    panels.append(frames)
    labels.append("edit")
    if job.first_frame is not None:  # source | edited first frame | result
        from stages.edit.first_frame import preview_panels

        panels, labels = preview_panels(panels[0], job.first_frame, frames)
    outputs["preview"] = str(write_gif(ws.file_path(f"{base}/preview.gif"), side_by_side(*panels, labels=labels), fps))
    if job.cfg.output:
        outputs["output"] = str(write_mp4(job.cfg.output, frames, fps))
    return outputs


def _versions() -> dict[str, str]:
    import diffusers

    return {"vd": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _verify_inputs(ws: Workspace, cfgs: Sequence[EditConfig]) -> None:
    """Decode every array an edit reads besides the inversion (already in memory) before anything is
    written, so a damaged workspace fails with a named InputError instead of a half-written edit."""
    names = ["video/frames", "inversion/reconstruction"]
    if any(c.sa2 for c in cfgs):
        names.append("masks/edit")
    if any(c.regions for c in cfgs):
        names += object_arrays(object_names(ws)[0])
    for name in names:
        if ws.has(name):
            ws.verify(name)


# ----------------------------------------------------------------------------------------- entry points
def _oom_plan(ws: Workspace, cfgs: Sequence[EditConfig], progress: Any = None, models: Any = None, *_: Any,
              **__: Any) -> Any:
    """The edit's MemoryPlan (stages.models.oom) for run_edits' own arguments: clip size, window, model."""
    from stages.models.oom import MemoryPlan

    frames, height, width = (int(v) for v in ws.array("video/frames").shape[:3])
    attrs = ws.group_attrs("inversion")
    settings = attrs.get("settings") or {}
    dtype, device = "fp32", ""
    if models is not None:
        from stages.invert.checkpointing import models_dtype

        dtype, device = models_dtype(models), str(models.device)
    return MemoryPlan("edit", frames, height, width, dtype, window=settings.get("window"),
                      model=str((attrs.get("model") or {}).get("spec", "")), device=device)


@oom_answered(_oom_plan)
@stagelock.scoped
def run_edits(ws: Workspace, cfgs: Sequence[EditConfig], progress: Progress | None = None,
              models: Any = None) -> list[dict[str, Any]]:
    """Run several edits on one workspace with the model loaded once; returns one summary per edit.

    All prompts, names and words are checked before the model loads.
    """
    progress = progress or Progress(quiet=True)
    if not cfgs:
        raise InputError("no edits to run (empty prompt list)")
    stagelock.hold(ws.path, stagelock.WORKSPACE, "vd edit", f"workspace {ws.path}", shared=True)
    reading = stagelock.hold(ws.path, "inversion", "vd edit", f"the inversion in {ws.path}", shared=True)
    inv = load_inversion_for_edit(ws)
    _verify_inputs(ws, cfgs)
    reading.release()
    jobs = []
    for cfg in cfgs:
        jobs.append(plan_edit(ws, inv, cfg))  # option errors (exit 2) before the inversion's region
        _check_region(ws, inv, cfg, progress)
    names = [j.name for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"several edits would be named {dup[0]!r}; give distinct prompts or names")
    from stages.edit.first_frame import require_weights

    require_weights(jobs)  # SparseCtrl for --first-frame: exit 4 before any model loads
    for name in names:  # one writer per edit name, held until every edit of this run is written
        stagelock.hold(ws.path, f"edits/{name}", "vd edit", f"edit {name!r} in {ws.path}")
    for job in jobs:
        progress.log(f"edit {job.name!r}: {job.target}")
        if job.cfg.reweight and not job.cfg.cross:
            progress.log("note: --reweight acts through the cross-attention control, which --no-cross disables")
    timings: dict[str, float] = {}
    if models is None:
        from stages.models.load import load_models

        start = time.perf_counter()
        pfg = (inv.attrs.get("config") or {}).get("per_frame_groupnorm", True)
        models = load_models(inv.model.get("spec", "sd15-animatediff-v3"), device=cfgs[0].device,
                             dtype=cfgs[0].dtype, per_frame_groupnorm=pfg)
        timings["load_models"] = time.perf_counter() - start
    spec, fingerprint = inv.model.get("spec", "?"), inv.model.get("fingerprint")
    if fingerprint and models.fingerprint != fingerprint:
        from stages.models.identity import is_legacy, legacy_message

        if is_legacy(fingerprint):
            raise InputError(legacy_message(fingerprint, str(ws.path)))
        raise InputError(f"workspace was inverted with model {spec} ({fingerprint}); the loaded model is "
                         f"{models.spec} ({models.fingerprint})")
    results = []
    for job in jobs:
        try:
            results.append(_run_job(ws, inv, models, job, progress, timings if not results else {}))
        except KeyboardInterrupt:
            done = f"; finished edits: {', '.join(r['name'] for r in results)}" if results else ""
            raise Interrupted(f"interrupted during edit {job.name!r} (rerun to redo it){done}") from None
    return results


def _run_job(ws: Workspace, inv: Inversion, models: Any, job: EditJob, progress: Progress,
             timings: dict[str, float]) -> dict[str, Any]:
    from stages.models.ops import vae_decode

    base = f"edits/{job.name}"
    if ws.has(base):
        ws.remove(base)
    params = config_dict(job.cfg)
    ws.update_attrs(base, prompt=job.cfg.prompt, resolved_prompt=job.target, source_prompt=inv.prompt,
                    mode=job.mode, words=job.words, params=params, status="running",
                    model={"spec": models.spec, "fingerprint": models.fingerprint},
                    **read_record(ws, inv, job))  # what it read: what stages.edit.fresh compares
    if job.first_frame is not None:  # a copy of the image, its digests and settings in the edit's folder
        from stages.edit.first_frame import record

        record(ws, base, job.first_frame)
    start = time.perf_counter()
    latent, stats = edit_latents(ws, inv, models, job, progress)
    timings["edit"] = time.perf_counter() - start
    start = time.perf_counter()
    frames = vae_decode(models, latent)
    timings["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    outputs = _write_outputs(ws, inv, job, frames)
    timings["write"] = time.perf_counter() - start
    seed = (inv.attrs.get("config") or {}).get("seed", 42)
    ws.update_attrs(base, seed=seed, timings=timings, versions=_versions(), stats=stats, outputs=outputs,
                    status="done")
    return {"name": job.name, "prompt": job.cfg.prompt, "resolved_prompt": job.target, "mode": job.mode,
            "words": job.words, "outputs": outputs, "timings": timings, "unet_calls": stats["unet_calls"],
            "cross_mode": stats["cross_mode"], "frames": list(frames.shape),
            **({"first_frame": stats["first_frame"]} if "first_frame" in stats else {})}


def run_edit(ws: Workspace, cfg: EditConfig, progress: Progress | None = None, models: Any = None) -> dict[str, Any]:
    """Run one edit (see run_edits)."""
    return run_edits(ws, [cfg], progress, models)[0]
