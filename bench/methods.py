"""Inversion methods side by side (`vd invert --method`): time and reconstruction on the tiny bench clip.

    .venv/bin/python bench/methods.py                 # tiny model on CPU, appends to bench/RESULTS.md
    .venv/bin/python bench/methods.py --no-record     # print only

Each method runs in its own worker process on a fresh copy of bench.py's generated clip (tiny size: 8 frames,
128 px, 10 steps, 5 null steps); the model is loaded before the clock and the memory window start. Columns:
stage wall time, the per-step loop, UNet sample-forwards / backwards, peak memory, the reconstruction PSNR
against the VAE-only ceiling, and how far the reconstruction latents are from the DDIM inversion path.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench as B  # noqa: E402  (the shared harness: workspace maker, memory probes, commit id)

METHODS = ("null-text", "direct", "negative-prompt")


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from stages.common.config import build_config
    from stages.common.progress import Progress
    from stages.invert import InvertConfig, run_invert
    from stages.io.workspace import Workspace
    from stages.models.load import load_models

    ws = Workspace.open(args.workspace)
    models = load_models(args.model, device=args.device)
    B._reset_peak_memory(args.device)
    t0 = time.perf_counter()
    cfg = build_config(InvertConfig, {"prompt": B.PROMPT, "subject": "red ball", "model": args.model,
                                      "steps": args.steps, "null_steps": args.null_steps, "device": args.device,
                                      "method": args.method})
    result = run_invert(ws, cfg, Progress(quiet=True), models=models)
    wall = time.perf_counter() - t0
    lat, rec = ws.read("inversion/latents"), ws.read("inversion/recon_latents")
    path_rel = float(np.abs(rec - lat).max() / np.abs(lat).max())
    timings = result["timings"]
    loop = timings.get("direct_s", timings.get("null_text_s", wall))
    counts = result["counts"]["this_run"]
    return {"method": args.method, "wall_s": wall, "loop_s": loop, "per_step_s": loop / args.steps,
            "fwd": counts["unet_forwards"] + counts["unet_gt_forwards"], "bwd": counts["backwards"],
            "peak_gib": B._peak_memory(args.device), "recon": result["recon"], "path_rel": path_rel,
            "threads": torch.get_num_threads()}


def run_worker(method: str, workspace: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--workspace", str(workspace),
           "--model", args.model, "--steps", str(args.steps), "--null-steps", str(args.null_steps),
           "--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"bench: {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_report(meta: dict, rows: list[dict]) -> str:
    lines = [f"## Inversion methods ({meta['when']}, commit {meta['commit']}, {meta['device']}, {meta['settings']})",
             "",
             "| method | wall s | s/step | UNet fwd | UNet bwd | peak GiB | PSNR dB | VAE ceiling dB | latent MSE "
             "| recon vs DDIM path (max rel) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = r["recon"]
        lines.append(f"| {r['method']} | {r['wall_s']:.1f} | {r['per_step_s']:.2f} | {r['fwd']} | {r['bwd']} "
                     f"| {r['peak_gib']:.2f} | {rec['psnr']:.2f} | {rec['vae_psnr']:.2f} | {rec['latent_mse']:.3e} "
                     f"| {r['path_rel']:.1e} |")
    by = {r["method"]: r for r in rows}
    base = by.get("null-text")
    if base:
        ratios = ", ".join(f"{m} {by[m]['wall_s'] / base['wall_s']:.2f} ({by[m]['loop_s'] / base['loop_s']:.2f} "
                           f"of the per-step loop)" for m in by if m != "null-text")
        lines += ["", f"Stage wall time relative to null-text: {ratios}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--workspace", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=B.SIZES["tiny"]["model"], help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=B.SIZES["tiny"]["steps"], help=argparse.SUPPRESS)
    ap.add_argument("--null-steps", type=int, default=B.SIZES["tiny"]["null_steps"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args), default=str))
        return
    size = B.SIZES["tiny"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vd-bench-methods-") as tmp:
        for method in args.methods.split(","):
            ws = Path(tmp) / method
            B.make_workspace(ws, size["frames"], size["px"])
            rows.append(run_worker(method, ws, args))
            print(f"{method}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    meta = {"when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "commit": B.commit_id(),
            "device": B.device_name(args.device),
            "settings": f"tiny, {size['frames']} frames, {size['px']} px, {args.steps} steps, {args.null_steps} "
                        f"null steps, {rows[0]['threads']} thread(s)"}
    report = format_report(meta, rows)
    print(report)
    if not args.no_record:
        with B.RESULTS.open("a") as fh:
            fh.write("\n" + report)


if __name__ == "__main__":
    main()
