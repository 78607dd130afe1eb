"""Stage `vd edit`: VideoDirector editing from a finished inversion (ALGORITHM.md §5).

Per sampling step i one UNet call runs four slots [edit-uncond(phi_i), edit-cond(target),
recon-uncond(negative prompt), recon-cond(source)] (§5.1); the recon slots get the stored inversion latent
z*_{t_i} = latents[S - i]. Attention edits (stages.method.control.editing): P2P refine/swap + reweight for
steps < int(tau_c (S + 1)), SA-I for steps < int(S tau_s), SA-II after. The edit latent is updated with
CFG (the inversion's scale) and the stored STDG gradient G_i (§3.7). Outputs go to edits/<name>/.
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
from stages.method.control.controller import AttentionController, install
from stages.method.control.editing import (BLEND_BLOCKS, SA1_MAX_TOKENS, SA2_BLOCKS, EditAttention, KeyMasks, LocalBlend,
                                    sa1_layers)
from stages.method.ddim import cfg as cfg_combine, ddim_step
from stages.common.errors import InputError, Interrupted, UsageError
from stages.invert.run import Inversion
from stages.common.progress import Progress
from stages.method.prompts import changed_words, cross_plan, resolve_prompt, slug, word_positions, words
from stages.method.windows import Windows, blend as blend_windows, plan_windows
from stages.io.workspace import Workspace, check_name


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


# ----------------------------------------------------------------------------------------- inputs
def load_inversion_for_edit(ws: Workspace) -> Inversion:
    """The workspace's finished inversion (stages.invert.run.load_inversion), checked for what editing needs."""
    from stages.invert.run import load_inversion

    inv = load_inversion(ws)
    if inv.attrs.get("status") != "done":
        raise InputError(f"the inversion in {ws.path} is not finished (status {inv.attrs.get('status')!r}); "
                         f"rerun `vd invert {ws.path}` to complete it")
    shape = inv.latents.shape
    if inv.null_embeddings.shape[:2] != (inv.steps, shape[1]) or inv.guidance.shape != (inv.steps,) + shape[1:] \
            or shape[0] != inv.steps + 1:
        raise InputError(f"the inversion arrays in {ws.path} have inconsistent shapes; re-invert with --restart")
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
    target, mode = resolve_prompt(cfg.prompt, inv.prompt, inv.subject)
    for word in cfg.reweight:
        if not _contains(target, word):
            raise InputError(f"reweight word {word!r} is not in the target prompt {target!r}")
    for word in cfg.blend:
        if not (_contains(target, word) or _contains(inv.prompt, word)):
            raise InputError(f"blend word {word!r} is in neither the target nor the source prompt")
    changed = changed_words(inv.prompt, target)
    reweighted = [w for w in cfg.reweight if " ".join(words(w)) not in changed]
    name = check_name(cfg.name or slug(changed or list(cfg.reweight)))
    if "/" in name:
        raise InputError(f"invalid edit name {name!r}: no '/'")
    if name in RESERVED_NAMES:
        raise InputError(f"edit name {name!r} is reserved (vd eval stores eval/{name} for its own use); "
                         f"choose another with --name")
    _check_output(cfg.output)
    existing = ws.group_attrs(f"edits/{name}")
    if existing and existing.get("status") == "done" and not cfg.force:
        raise InputError(f"edit {name!r} already exists in {ws.path}; pass --force to replace it or --name NEW")
    return EditJob(cfg, name, target, mode, changed + reweighted)


# ----------------------------------------------------------------------------------------- the loop
def _blend_positions(tokenizer: Any, text: str, blend_words: Sequence[str]) -> list[int]:
    out: list[int] = []
    for word in blend_words:
        out.extend(word_positions(tokenizer, text, word))
    return sorted(set(out))


@torch.no_grad()
def edit_latents(ws: Workspace, inv: Inversion, models: Any, job: EditJob,
                 progress: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the S editing steps; returns the final edit latent (F, 4, h, w) and run statistics."""
    from stages.models.load import encode_text, unet_eps

    cfg, steps = job.cfg, inv.steps
    dev = models.device
    lat = torch.from_numpy(np.asarray(inv.latents, dtype=np.float32)).to(dev)
    frames, h, w = lat.shape[1], lat.shape[3], lat.shape[4]
    windows = inversion_windows(inv)
    emb_tgt, emb_src, emb_neg = encode_text(models, [job.target, inv.prompt, inv.negative_prompt]).to(dev)

    plan = cross_plan(models.tokenizer, inv.prompt, job.target, cfg.reweight, cfg.cross_mode)
    key_masks = None
    if cfg.sa2:
        if not ws.has("masks/edit"):
            raise InputError(f"workspace {ws.path} has no masks/edit; run `vd mask` (or pass --no-sa2)")
        fg = torch.from_numpy(np.asarray(ws.read("masks/edit")) > 0)
        hide = ~fg if cfg.background else fg
        key_masks = [KeyMasks(hide[s:e_], (h, w)) for s, e_ in windows.spans]
    blends = None
    if cfg.blend:  # one recorder per window: maps exist per window, the masks are blended per frame
        src_pos = _blend_positions(models.tokenizer, inv.prompt, cfg.blend)
        tgt_pos = _blend_positions(models.tokenizer, job.target, cfg.blend)
        blends = [LocalBlend(src_pos, tgt_pos, (h, w), cfg.blend_threshold) for _ in windows.spans]
    sa1_steps = int(steps * cfg.tau_s)
    cross_steps = int(cfg.tau_c * (steps + 1))
    controller = install(models.unet, AttentionController())
    sa1_names = sa1_layers(controller.names, (h, w), cfg.sa1_max_tokens, cfg.sa1_blocks,
                           levels=len(models.unet.down_blocks))
    control = EditAttention(sa1=cfg.sa1, sa2=cfg.sa2, cross=cfg.cross, sa1_steps=sa1_steps, cross_steps=cross_steps,
                            mapper=plan.mapper, alphas=plan.alphas, equalizer=plan.equalizer,
                            key_masks=key_masks[0] if key_masks else None, blend=blends[0] if blends else None,
                            sa1_layers=tuple(sa1_names), sa2_blocks=tuple(cfg.sa2_blocks),
                            blend_blocks=tuple(cfg.blend_blocks))
    installed = control.install(controller)
    blend_from = int(steps * cfg.blend_start)

    e = lat[steps].clone()
    sched = inv.schedule
    try:
        with progress.task(f"edit {job.name}", total=steps) as advance:
            for i in range(steps):
                controller.step = i
                t, t_prev = sched.edit_timesteps[i], sched.edit_prev[i]
                phi = torch.from_numpy(np.asarray(inv.null_embeddings[i], dtype=np.float32)).to(dev)
                ref = lat[steps - i]
                batch = torch.stack([e, e, ref, ref])
                for rec in blends or ():
                    rec.reset()

                def window_eps(s: int, e_: int) -> torch.Tensor:
                    k, n = windows.spans.index((s, e_)), e_ - s
                    control.key_masks = key_masks[k] if key_masks else None
                    control.blend = blends[k] if blends else None
                    emb = torch.cat([phi[s:e_], emb_tgt.expand(n, -1, -1), emb_neg.expand(n, -1, -1),
                                     emb_src.expand(n, -1, -1)])
                    return unet_eps(models, batch[:, s:e_], t, emb)

                eps = blend_windows(windows, window_eps)
                guidance = None
                if cfg.stdg:
                    guidance = torch.from_numpy(np.asarray(inv.guidance[i], dtype=np.float32)).to(dev)
                e = ddim_step(e, cfg_combine(eps[0], eps[1], inv.cfg), t, t_prev, guidance=guidance)
                if blends is not None and i >= blend_from:
                    mask = _blend_mask(windows, blends)
                    if mask is not None:
                        target = lat[steps - 1 - i]
                        e = target + mask.to(dev) * (e - target)
                advance(1, t=t)
    finally:
        controller.clear()
    stats = {"unet_calls": steps, "unet_batch": 4, "sa1_steps": sa1_steps if cfg.sa1 else 0,
             "sa2_steps": steps - sa1_steps if cfg.sa2 else 0, "cross_steps": cross_steps if cfg.cross else 0,
             "cross_mode": plan.mode, "installed": {k: len(v) for k, v in installed.items()},
             "sa1_layers": [n.removesuffix(".attn1") for n in installed["sa1"]],
             "calls": dict(control.usage), "windows": windows.describe()}
    return e, stats


def inversion_windows(inv: Inversion) -> Windows:
    """The temporal windows the inversion ran with (one window for inversions made before windows)."""
    spec = inv.attrs.get("windows") or {}
    if not spec:
        return Windows(inv.frames, inv.frames, 0, ((0, inv.frames),))
    return plan_windows(inv.frames, int(spec["window"]), int(spec["overlap"]))


def _blend_mask(windows: Windows, blends: list[LocalBlend]) -> torch.Tensor | None:
    """The local-blend mask per frame: one window's own, or the windows' masks mixed with their weights."""
    masks = dict(zip(windows.spans, (b.mask() for b in blends)))
    if windows.single or all(m is None for m in masks.values()):
        return next(iter(masks.values()))
    ref = next(m for m in masks.values() if m is not None)
    # a window without recorded maps blends nothing in (a zero mask keeps the reconstruction path)
    return blend_windows(windows, lambda s, e_: ref.new_zeros((e_ - s,) + tuple(ref.shape[1:]))
                         if masks[(s, e_)] is None else masks[(s, e_)], frame_dim=0)


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
    for name in names:
        if ws.has(name):
            ws.verify(name)


# ----------------------------------------------------------------------------------------- entry points
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
        _check_region(ws, inv, cfg, progress)
        jobs.append(plan_edit(ws, inv, cfg))
    names = [j.name for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"several edits would be named {dup[0]!r}; give distinct prompts or names")
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
    from stages.models.load import vae_decode

    base = f"edits/{job.name}"
    if ws.has(base):
        ws.remove(base)
    params = config_dict(job.cfg)
    ws.update_attrs(base, prompt=job.cfg.prompt, resolved_prompt=job.target, source_prompt=inv.prompt,
                    mode=job.mode, words=job.words, params=params, status="running",
                    model={"spec": models.spec, "fingerprint": models.fingerprint})
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
            "cross_mode": stats["cross_mode"], "frames": list(frames.shape)}


def run_edit(ws: Workspace, cfg: EditConfig, progress: Progress | None = None, models: Any = None) -> dict[str, Any]:
    """Run one edit (see run_edits)."""
    return run_edits(ws, [cfg], progress, models)[0]
