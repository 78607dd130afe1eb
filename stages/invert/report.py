"""The end of an inversion: the decoded reconstruction, its PSNR, the videos and the run's summary."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from stages.common.progress import Progress
from stages.invert.config import FLOAT_STATS, GROUP, STAT_COLUMNS, InvertConfig
from stages.invert.passes import Passes
from stages.io.workspace import Workspace


def _video_psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    from stages.quality.metrics import psnr

    f, h, w, c = a.shape
    reg = None if region is None else region.reshape(f * h, w).astype(bool)
    return psnr(a.reshape(f * h, w, c), b.reshape(f * h, w, c), reg)


def _report(ws: Workspace, cfg: InvertConfig, progress: Progress, models: Any, passes: Passes, schedule: Any,
            latents: Any, frames: np.ndarray, mask: np.ndarray | None, neg: Any, c_src: Any,
            arrays: dict[str, Any], timings: dict[str, float], t_begin: float, start: int) -> dict[str, Any]:
    import torch

    from stages.method import ddim
    from stages.models.ops import vae_decode

    S, F = schedule.steps, int(frames.shape[0])
    t0 = time.perf_counter()
    stored = ws.group_attrs(GROUP)
    recon = dict(stored.get("recon") or {})
    final = torch.from_numpy(arrays["recon"][0]).to(models.device)
    if not bool(arrays["done"][S]):
        progress.log("decoding the reconstruction ...")
        rec = vae_decode(models, final)
        ws.write_array(f"{GROUP}/reconstruction", rec)
        vae_rec = vae_decode(models, latents[0])
        region = None if mask is None else mask.astype(bool)
        recon = {"latent_mse": float(((final - latents[0]) ** 2).mean()),
                 "psnr": _video_psnr(rec, frames), "vae_psnr": _video_psnr(vae_rec, frames)}
        if region is not None:
            recon.update(psnr_fg=_video_psnr(rec, frames, region), psnr_bg=_video_psnr(rec, frames, ~region))
        _write_videos(ws, frames, rec)
    if cfg.compare_ddim and "ddim_psnr" not in recon:
        progress.log("plain DDIM reconstruction for comparison ...")
        z = latents[S][None]
        with torch.no_grad():
            for i in range(S):
                t, tp = schedule.timesteps[i], schedule.prev[i]
                both = passes.eps(torch.cat([z, z]), t, torch.cat([neg.expand(F, -1, -1), c_src]))
                z = ddim.ddim_step(z, ddim.cfg(both[:1], both[1:], cfg.cfg), t, tp)
        ddim_rec = vae_decode(models, z[0])
        recon.update(ddim_latent_mse=float(((z[0] - latents[0]) ** 2).mean()),
                     ddim_psnr=_video_psnr(ddim_rec, frames))
    timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_begin

    stats = arrays["stats"][...]
    per_step = [{"step": i, **{c: (float(stats[i, k]) if c in FLOAT_STATS else int(stats[i, k]))
                               for k, c in enumerate(STAT_COLUMNS)}} for i in range(S)]
    col = {c: k for k, c in enumerate(STAT_COLUMNS)}
    counts = {"this_run": {"unet_forwards": passes.forwards, "unet_gt_forwards": passes.gt_forwards,
                           "backwards": passes.backwards},
              "null_text_total": {"unet_forwards": int(stats[:, col["forwards"]].sum()),
                                  "unet_gt_forwards": int(stats[:, col["gt_forwards"]].sum()),
                                  "backwards": int(stats[:, col["backwards"]].sum())},
              "ddim_inversion_forwards": S}
    summary = {
        "workspace": str(ws.path), "status": "done", "steps": S, "frames": F, "resumed_from": start,
        "model": {"spec": cfg.model, "fingerprint": models.fingerprint, "device": str(models.device),
                  "dtype": str(models.dtype).removeprefix("torch.")},
        "method": cfg.method, "prompt": cfg.prompt, "region": cfg.region, "stdg": list(cfg.coefficients()),
        "cfg": cfg.cfg, "schedule": schedule.name, "plain": cfg.plain, "recon": recon, "timings": timings,
        "counts": counts,
        "inner_iterations": [p["inner"] for p in per_step], "per_step": per_step,
        "outputs": {k: str(ws.file_path(f"{GROUP}/{k}")) for k in ("reconstruction.mp4", "preview.gif")},
    }
    ws.update_attrs(GROUP, status="done", subject=cfg.subject, recon=recon, timings=timings, counts=counts,
                    summary=summary)
    arrays["done"][S] = True
    return summary


def _write_videos(ws: Workspace, frames: np.ndarray, rec: np.ndarray) -> None:
    from stages.io.video import side_by_side, write_gif, write_mp4

    fps = float((ws.attrs.get("source") or {}).get("fps_out") or 8.0)
    write_mp4(ws.file_path(f"{GROUP}/reconstruction.mp4"), rec, fps)
    write_gif(ws.file_path(f"{GROUP}/preview.gif"), side_by_side(frames, rec, labels=["source", "reconstruction"]), fps)
