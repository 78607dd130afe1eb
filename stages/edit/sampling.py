"""The sampling loop of `vd edit` (ALGORITHM.md §5): S steps of one 4-slot UNet call each, the attention
edits of stages.method.control.editing, CFG, the stored STDG gradient and the local blend; windows mixed
per frame (stages.method.windows). Per-region edits add their pieces from stages.edit.regions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from stages.common.errors import InputError
from stages.common.progress import Progress
from stages.edit.first_frame import first_frame_control
from stages.edit.offsets import recon_uncond, source_branch
from stages.io.workspace import Workspace
from stages.method.control.controller import AttentionController, install
from stages.method.control.editing import EditAttention, KeyMasks, LocalBlend, sa1_layers
from stages.method.ddim import cfg as cfg_combine, ddim_step
from stages.method.prompts import cross_plan, word_positions
from stages.method.windows import Windows, blend as blend_windows, plan_windows

if TYPE_CHECKING:
    from stages.invert import Inversion


def _blend_positions(tokenizer: Any, text: str, blend_words: Sequence[str]) -> list[int]:
    out: list[int] = []
    for word in blend_words:
        out.extend(word_positions(tokenizer, text, word))
    return sorted(set(out))


@torch.no_grad()
def edit_latents(ws: Workspace, inv: Inversion, models: Any, job: Any,
                 progress: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the S editing steps of `job` (a stages.edit.run.EditJob, from plan_edit); returns the final edit
    latent (F, 4, h, w) and run statistics."""
    from stages.models.ops import encode_text, unet_eps

    cfg, steps = job.cfg, inv.steps
    dev = models.device
    lat = torch.from_numpy(np.asarray(inv.latents, dtype=np.float32)).to(dev)
    h, w = lat.shape[3], lat.shape[4]
    windows = inversion_windows(inv)
    source = source_branch(inv, dev)  # direct inversion: the source branch and its offsets (edit/offsets.py)
    emb_tgt, emb_src, emb_neg = encode_text(models, [job.target, inv.prompt, inv.negative_prompt]).to(dev)
    first = first_frame_control(job, models, inv, progress)  # --first-frame: SparseCtrl on the target slots

    plan = cross_plan(models.tokenizer, inv.prompt, job.target, cfg.reweight, cfg.cross_mode, device=dev)
    regional = None
    if job.regions is not None:  # per-region edit: SA-II per object, layout, blend per object
        from stages.edit.regions import region_controls

        regional = region_controls(ws, job.regions, cfg, models.tokenizer, inv.prompt, job.target, windows.spans,
                                   (h, w), inv.schedule.edit_timesteps, steps)
    key_masks = None
    if cfg.sa2 and regional is None:
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
    elif regional is not None and cfg.region_blend:
        blends = [r.blend for r in regional]
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
    if regional is not None:
        control.layout, control.regions = regional[0].layout, regional[0].keys if cfg.sa2 else None
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
                ref = lat[steps - i] if source is None else source.latent
                batch = torch.stack([e, e, ref, ref])
                for rec in blends or ():
                    rec.reset()

                def window_eps(s: int, e_: int) -> torch.Tensor:
                    k, n = windows.spans.index((s, e_)), e_ - s
                    control.key_masks = key_masks[k] if key_masks else None
                    control.blend = blends[k] if blends else None
                    if regional is not None:
                        control.layout, control.regions = regional[k].layout, regional[k].keys if cfg.sa2 else None
                    emb = torch.cat([phi[s:e_], emb_tgt.expand(n, -1, -1), recon_uncond(inv, phi[s:e_], emb_neg),
                                     emb_src.expand(n, -1, -1)])
                    extra = first.residuals(i, s, e_, t, emb) if first is not None else None
                    if extra is not None:
                        return unet_eps(models, batch[:, s:e_], t, emb, residuals=extra)
                    return unet_eps(models, batch[:, s:e_], t, emb)

                eps = blend_windows(windows, window_eps)
                if source is not None:  # the offset goes to the source branch only, never to e
                    source.step(i, eps[2], eps[3], t, t_prev)
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
    if first is not None:
        stats["first_frame"] = first.describe()
    if regional is not None:
        stats["regions"] = [r.name for r in job.regions.regions]
        stats["layout_steps"] = regional[0].layout.steps if regional[0].layout is not None else 0
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
