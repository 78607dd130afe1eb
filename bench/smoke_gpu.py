"""`make smoke-gpu`: the first command to run on a GPU (issue 30). In under two minutes on one GPU (estimate):
`vd mask` (random SAM2 weights) -> `vd invert` -> `vd edit` -> `vd export` (when present) on a generated
16 x 512² clip with `sd15-random` in bf16, through the stages' own entry points. Asserts finite outputs and,
per stage, a measured peak (torch.cuda.max_memory_allocated, weights resident) within 15% of
stages.models.memory's prediction; prints each stage's time and peak and appends them to bench/RESULTS.md.

    python bench/smoke_gpu.py                       # the GPU run
    python bench/smoke_gpu.py --device cpu --model tiny --frames 4 --px 64 --no-record   # plumbing, no GPU

On a machine without CUDA (and no --device cpu) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench as B  # noqa: E402  (the shared harness: commit id)

PROMPT = "a red ball rolling over a textured floor"
SUBJECT = "red ball"
TOLERANCE = 0.15  # measured peak within 15% of the prediction
GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.full_size_args(ap, 5, 2, "DDIM steps of the inversion and the edit")
    return ap.parse_args(argv)


class Stages:
    """Runs stages one by one, recording wall time and (on CUDA) the peak of each."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, work: Callable[[], Any], predicted: int | None = None) -> Any:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = work()
        if self.cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if self.cuda else None
        self.rows.append({"stage": name, "seconds": time.perf_counter() - t0, "peak": peak, "predicted": predicted})
        print(f"smoke-gpu: {name}: {self.rows[-1]['seconds']:.1f} s" + (f", peak {peak / GIB:.2f} GiB" if peak else "")
              + (f" (predicted {predicted / GIB:.2f} GiB)" if predicted else ""), flush=True)
        return out

    def check_peaks(self) -> list[str]:
        """The stages whose measured peak is off the prediction by more than TOLERANCE."""
        bad = []
        for r in self.rows:
            if r["peak"] and r["predicted"]:
                off = abs(r["peak"] - r["predicted"]) / r["predicted"]
                r["off"] = off
                if off > TOLERANCE:
                    bad.append(f"{r['stage']}: measured {r['peak'] / GIB:.2f} GiB, predicted "
                               f"{r['predicted'] / GIB:.2f} GiB ({off:.0%} off, more than {TOLERANCE:.0%})")
        return bad


def make_clip(folder: Path, frames: int, px: int) -> tuple[Path, str]:
    """A generated clip (a moving disc) as an mp4, and a box around the disc on frame 0 (X0,Y0,X1,Y1)."""
    import numpy as np

    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    video, masks = moving_disc(frames, px, px, seed=0)
    ys, xs = np.nonzero(masks[0])
    box = f"{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}"
    return write_mp4(folder / "clip.mp4", video, fps=8.0), box


def check_finite(ws: Any, edit: str) -> None:
    """Finite inversion arrays and an edit that is not blank (NaN latents decode to a flat image)."""
    import numpy as np

    for name in ("latents", "recon_latents", "null_embeddings", "stdg/guidance"):
        if not np.isfinite(ws.read(f"inversion/{name}")).all():
            raise AssertionError(f"inversion/{name} holds non-finite values")
    frames = ws.read(f"edits/{edit}/frames")
    if frames.std() == 0:
        raise AssertionError(f"edits/{edit}/frames is a flat image (non-finite latents?)")


def smoke(args: argparse.Namespace) -> Stages:
    import torch

    from stages.common.progress import Progress
    from stages.edit.run import EditConfig, run_edits
    from stages.invert import InvertConfig, run_invert
    from stages.io.workspace import Workspace
    from stages.mask.run import MaskConfig, run_mask
    from stages.models import memory
    from stages.models.load import load_models

    cuda = torch.device(args.device).type == "cuda"
    stages = Stages(cuda)
    progress = Progress(quiet=True)
    F, px = args.frames, args.px
    dtype = memory.canonical_dtype(args.dtype)
    with tempfile.TemporaryDirectory(prefix="vd-smoke-") as tmp:
        clip, box = make_clip(Path(tmp), F, px)
        ws_path = Path(tmp) / "smoke.vd"
        stages.run("mask", lambda: run_mask(clip, ws_path, MaskConfig(frames=F, size=str(px), box=box, sam2="random",
                                                                      device=args.device), progress))
        models = stages.run("load", lambda: load_models(args.model, device=args.device, dtype=args.dtype))
        ws = Workspace.open(ws_path)
        inv_cfg = InvertConfig(prompt=PROMPT, subject=SUBJECT, model=args.model, steps=args.steps,
                               null_steps=args.null_steps, device=args.device, dtype=args.dtype,
                               checkpointing="off", window=max(F, 16))
        predict = cuda and args.model == "sd15-random"
        stages.run("invert", lambda: run_invert(ws, inv_cfg, progress, models=models),
                   memory.predict_stage_peak("invert", F, px, px, dtype, "off", inv_cfg.window) if predict else None)
        edit = stages.run("edit", lambda: run_edits(ws, [EditConfig(prompt="blue ball", device=args.device,
                                                                    dtype=args.dtype)], progress, models=models),
                          memory.predict_stage_peak("edit", F, px, px, dtype) if predict else None)[0]["name"]
        check_finite(ws, edit)
        try:
            from stages.export import ExportConfig, run_export
        except ImportError:
            print("smoke-gpu: export: skipped (no stages.export)")
        else:
            out = stages.run("export", lambda: run_export(ws, ExportConfig(edit=edit, codec="h264"), progress))
            if not Path(out["output"]).is_file():
                raise AssertionError(f"vd export wrote no file at {out['output']}")
    return stages


def record(args: argparse.Namespace, stages: Stages) -> None:
    import torch

    device = B.device_name(args.device if stages.cuda else "cpu")
    lines = [f"\n## smoke-gpu {B.utc_stamp()} {B.commit_id()} on {device}\n",
             f"`python bench/smoke_gpu.py` ({args.model}, {args.frames} x {args.px}², {args.dtype}, "
             f"{args.steps} steps, {args.null_steps} null-text iterations, torch {torch.__version__})\n",
             "| stage | seconds | peak GiB | predicted GiB | off |", "|---|---|---|---|---|"]
    for r in stages.rows:
        peak = f"{r['peak'] / GIB:.2f}" if r["peak"] else "-"
        pred = f"{r['predicted'] / GIB:.2f}" if r["predicted"] else "-"
        off = f"{r['off']:.0%}" if "off" in r else "-"
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {peak} | {pred} | {off} |")
    B.record("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("smoke-gpu: skipped: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine")
        return 0
    t0 = time.perf_counter()
    stages = smoke(args)
    bad = stages.check_peaks()
    total = time.perf_counter() - t0
    checked = f", peaks within {TOLERANCE:.0%} of the memory model" if stages.cuda else " (no peak check off CUDA)"
    print(f"smoke-gpu: total {total:.1f} s" + ("" if bad else ", outputs finite" + checked))
    if not args.no_record:
        record(args, stages)
    if bad:
        print("smoke-gpu: FAILED: " + "; ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
