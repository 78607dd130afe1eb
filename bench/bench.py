"""Benchmark `vd invert` + `vd edit` on a generated clip and append the figures to bench/RESULTS.md.

    python bench/bench.py --size tiny                      # tiny model, CPU, seconds
    python bench/bench.py --size full --device cuda --dtype bf16   # SD1.5 + AnimateDiff v3 shapes, random weights

Each stage runs in its own worker process so peak memory is per stage: peak RSS on CPU,
torch.cuda.max_memory_allocated on CUDA. The optimised inversion and the baseline (`plain`: the method
step by step as the reference computes it) run side by side on the same clip, so the speedup is a ratio
measured in one run. Random weights cost the same compute as real ones.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SIZES = {
    # model, frames, pixels, steps, null steps
    "tiny": dict(model="tiny", frames=8, px=128, steps=10, null_steps=5),
    "full": dict(model="sd15-random", frames=16, px=512, steps=50, null_steps=10),
}


def _peak_memory(device: str) -> float:
    """Peak memory of this process in GiB: CUDA allocator peak on GPU, max RSS on CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(args: argparse.Namespace) -> dict:
    """Run one stage in this process and return its measurements."""
    sys.path.insert(0, str(ROOT))
    from stages.config import build_config
    from stages.progress import Progress
    from stages.workspace import Workspace

    ws = Workspace.open(args.workspace)
    progress = Progress(quiet=not args.verbose)
    t0 = time.perf_counter()
    if args.worker == "edit":
        from stages.edit import EditConfig, run_edit

        cfg = build_config(EditConfig, {"prompt": "a blue ball rolling", "name": "bench", "device": args.device,
                                        "dtype": args.dtype, "force": True})
        result = run_edit(ws, cfg, progress)
    else:
        from stages.invert import InvertConfig, run_invert

        cfg = build_config(InvertConfig, {
            "prompt": "a red ball rolling over a textured floor", "subject": "red ball", "model": args.model,
            "steps": args.steps, "null_steps": args.null_steps, "device": args.device, "dtype": args.dtype,
            "plain": args.worker == "baseline", "restart": True})
        result = run_invert(ws, cfg, progress)
    wall = time.perf_counter() - t0
    return {"stage": args.worker, "wall_s": wall, "peak_gib": _peak_memory(args.device),
            "disk_mib": ws.size_bytes() / 2**20, "result": result}


def make_workspace(path: Path, frames: int, px: int) -> None:
    """A workspace holding a generated clip and its ground-truth mask (what `vd mask` leaves)."""
    sys.path.insert(0, str(ROOT))
    from stages.synthetic import moving_disc
    from stages.workspace import Workspace

    video, masks = moving_disc(frames, px, px, seed=0)
    ws = Workspace.create(path, {"path": "bench-synthetic", "sha256": f"bench-{frames}-{px}", "frames": frames,
                                 "size": [px, px], "start": 0, "stride": 1, "fps": 8.0, "fps_out": 8.0})
    ws.write_array("video/frames", video)
    ws.write_array("masks/raw", masks)
    ws.write_array("masks/edit", masks)


def run_worker(stage: str, workspace: Path, opts: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, "--workspace", str(workspace), "--model", opts.model,
           "--steps", str(opts.steps), "--null-steps", str(opts.null_steps), "--device", opts.device,
           "--dtype", opts.dtype] + (["--verbose"] if opts.verbose else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"bench: {stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(m: dict, steps: int) -> dict:
    """One table row from a worker's measurements."""
    r = m["result"]
    if m["stage"] == "edit":
        fwd, bwd = r.get("unet_forwards") or (r.get("counts") or {}).get("unet_forwards"), 0
        quality = ""
    else:
        c = r["counts"]["this_run"]
        fwd = c["unet_forwards"] + c["unet_gt_forwards"]
        bwd = c["backwards"]
        rec = r.get("recon") or {}
        quality = f"PSNR {rec.get('psnr', float('nan')):.2f} dB, latent MSE {rec.get('latent_mse', float('nan')):.2e}"
    return {"stage": m["stage"], "wall_s": m["wall_s"], "per_step_s": m["wall_s"] / steps, "unet_fwd": fwd,
            "unet_bwd": bwd, "peak_gib": m["peak_gib"], "disk_mib": m["disk_mib"], "quality": quality}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--null-steps", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--px", type=int)
    ap.add_argument("--no-baseline", action="store_true", help="skip the unoptimised baseline inversion")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workspace", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args), default=str))
        return
    preset = SIZES[args.size]
    for key in ("steps", "null_steps", "frames", "px"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.model = preset["model"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vd-bench-") as tmp:
        opt_ws, base_ws = Path(tmp) / "opt", Path(tmp) / "base"
        make_workspace(opt_ws, args.frames, args.px)
        rows.append(summarise(run_worker("invert", opt_ws, args), args.steps))
        rows.append(summarise(run_worker("edit", opt_ws, args), args.steps))
        if not args.no_baseline:
            make_workspace(base_ws, args.frames, args.px)
            rows.append(summarise(run_worker("baseline", base_ws, args), args.steps))
    report = format_report(args, rows)
    print(report)
    if not args.no_record:
        with RESULTS.open("a") as fh:
            fh.write(report + "\n")


def format_report(args: argparse.Namespace, rows: list[dict]) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "uncommitted"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### {when} | {device_name(args.device)} | commit {commit} | size {args.size} ({args.model}, "
             f"{args.frames} frames, {args.px}px, {args.steps} steps, {args.null_steps} null steps, dtype {args.dtype})",
             "", "| stage | wall s | s/step | UNet fwd | UNet bwd | peak GiB | workspace MiB | reconstruction |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['wall_s']:.1f} | {r['per_step_s']:.2f} | {r['unet_fwd']} | {r['unet_bwd']} "
                     f"| {r['peak_gib']:.2f} | {r['disk_mib']:.1f} | {r['quality']} |")
    by = {r["stage"]: r for r in rows}
    if "baseline" in by:
        lines += ["", f"Baseline / optimised inversion wall time: {by['baseline']['wall_s'] / by['invert']['wall_s']:.2f}x"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
