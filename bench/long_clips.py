"""Long clips through overlapping windows: peak memory and time vs frames, and seam quality per overlap.

    .venv/bin/python bench/long_clips.py                 # tiny model on CPU, appends to bench/RESULTS.md
    .venv/bin/python bench/long_clips.py --no-record     # print only

Each row runs in its own worker process (the model is loaded before the clock and the memory window start):
`vd invert` (windowed), one `vd edit`, then `vd eval --metrics warp`, on a generated moving-disc clip.
Memory is the peak RSS (CPU) or the CUDA allocator's peak (GPU) after the model load.
"""

from __future__ import annotations

import argparse
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

PROMPT = "a red ball rolling on a textured floor"


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from stages.common.config import build_config
    from stages.edit.run import EditConfig, run_edit
    from stages.evaluate import EvalConfig, run_eval
    from stages.invert import InvertConfig, run_invert
    from stages.models.load import load_models
    from stages.common.progress import Progress
    from stages.io.workspace import Workspace

    ws = Workspace.open(args.workspace)
    progress = Progress(quiet=True)
    models = load_models(args.model, device=args.device)
    B._reset_peak_memory(args.device)
    t0 = time.perf_counter()
    cfg = build_config(InvertConfig, {"prompt": PROMPT, "subject": "red ball", "model": args.model,
                                      "steps": args.steps, "null_steps": args.null_steps, "device": args.device,
                                      "window": args.window, "overlap": args.overlap})
    inv = run_invert(ws, cfg, progress, models=models)
    invert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_edit(ws, build_config(EditConfig, {"prompt": "a blue ball rolling", "name": "blue", "device": args.device}),
             progress, models=models)
    edit_s = time.perf_counter() - t0
    peak = B._peak_memory(args.device)
    ev = run_eval(ws, build_config(EvalConfig, {"metrics": ["warp"]}))
    seams = {name: {k: v for k, v in item["metrics"].items() if k in ("warp_error_seam", "warp_error_inside")}
             for name, item in ev["items"].items()}
    return {"frames": args.frames[0], "window": args.window, "overlap": args.overlap,
            "windows": len(ws.group_attrs("inversion")["windows"]["spans"]), "invert_s": invert_s,
            "edit_s": edit_s, "peak_gib": peak, "latents_mib": ws.size_bytes("inversion/latents") / 2**20,
            "recon_psnr": inv["recon"]["psnr"], "seams": seams}


def run_row(frames: int, window: int, overlap: int, opts: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "clip.vd"
        B.make_workspace(ws, frames, opts.px)
        cmd = [sys.executable, __file__, "--worker", "--workspace", str(ws), "--frames", str(frames),
               "--window", str(window), "--overlap", str(overlap), "--px", str(opts.px), "--steps", str(opts.steps),
               "--null-steps", str(opts.null_steps), "--model", opts.model, "--device", opts.device,
               "--threads", str(opts.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"long_clips: {frames} frames failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def report(opts: argparse.Namespace, scale: list[dict], seams: list[dict]) -> str:
    lines = [f"## Long clips ({time.strftime('%Y-%m-%d')}, commit {B.commit_id()}, {B.device_name(opts.device)}, "
             f"model {opts.model}, {opts.px} px, {opts.steps} steps, {opts.null_steps} null steps, "
             f"{opts.threads} thread(s))", "",
             f"Memory and time vs frames at window {opts.window}, overlap {opts.overlap}:", "",
             "| frames | windows | invert s | edit s | s per window (invert) | peak GiB | latents MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in scale:
        lines.append(f"| {r['frames']} | {r['windows']} | {fmt(r['invert_s'], 1)} | {fmt(r['edit_s'], 1)} | "
                     f"{fmt(r['invert_s'] / r['windows'], 2)} | {fmt(r['peak_gib'], 3)} | {fmt(r['latents_mib'], 1)} |")
    lines += ["", "Seams: warp error on frame pairs that cross a window border vs pairs inside windows "
              "(lower is smoother; the tiny model's frames are noise, so only the gap between the two means "
              "anything):", "",
              "| frames | window | overlap | recon seam | recon inside | edit seam | edit inside |",
              "|---|---|---|---|---|---|---|"]
    for r in seams:
        rec, ed = r["seams"].get("reconstruction", {}), r["seams"].get("blue", {})
        lines.append(f"| {r['frames']} | {r['window']} | {r['overlap']} | {fmt(rec.get('warp_error_seam'), 4)} | "
                     f"{fmt(rec.get('warp_error_inside'), 4)} | {fmt(ed.get('warp_error_seam'), 4)} | "
                     f"{fmt(ed.get('warp_error_inside'), 4)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--null-steps", type=int, default=2)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--frames", type=int, nargs="*", default=[16, 32, 64, 128])  # a worker gets one
    ap.add_argument("--seam-frames", type=int, default=48)
    ap.add_argument("--seam-overlaps", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workspace", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts)))
        return
    scale = [run_row(f, opts.window, opts.overlap, opts) for f in opts.frames]
    seams = [run_row(opts.seam_frames, opts.window, o, opts) for o in opts.seam_overlaps]
    text = report(opts, scale, seams)
    print(text)
    if not opts.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
