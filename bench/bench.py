"""Benchmark `vd invert` + `vd edit` on a generated clip and append the figures to bench/RESULTS.md.

    python bench/bench.py --size tiny                       # tiny model, CPU, about two minutes
    python bench/bench.py --size tiny --profile             # plus where a null-text step spends its time
    python bench/bench.py --size full --device cuda --dtype bf16   # SD1.5 + AnimateDiff v3 shapes, random weights
    python bench/bench.py --batch                           # `vd batch` clips/hour, 1 and 2 workers, model loads

Each stage runs in its own worker process. The model is loaded before the clock starts (its load time
is reported separately) and the peak-memory window opens after the load: peak RSS on CPU (Linux VmHWM),
torch.cuda.max_memory_allocated on CUDA, both with the model resident. The optimised inversion and the
baseline (`plain`: the method as the reference code computes it, without our savings) run on the same
clip, so the speedup is a ratio measured in one run, and their reconstructions are compared number for
number. Random weights cost the same compute as real ones.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SIZES = {
    # model, frames, pixels, steps, null steps
    "tiny": dict(model="tiny", frames=8, px=128, steps=10, null_steps=5),
    "full": dict(model="sd15-random", frames=16, px=512, steps=50, null_steps=10),
}
PROMPT = "a red ball rolling over a textured floor"
EDIT_NAME = "bench"
# profile phases in the order a null-text step runs them (stages.invert.PhaseTimer names)
PHASES = ("gt_forward", "stdg_forward", "stdg_backward", "eps_c_forward", "inner_forward", "inner_backward",
          "adam_step", "final_update", "gc", "commit")


def _reset_peak_memory(device: str) -> None:
    """Start the peak-memory window here (after the model load, whose transient copies are not the stage's):
    the CUDA allocator's peak, or on Linux the process's RSS high-water mark (VmHWM, via clear_refs)."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak below is the whole process's (load included)


def _peak_memory(device: str) -> float:
    """Peak memory in GiB since _reset_peak_memory: CUDA allocator peak on GPU, peak RSS on CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(args: argparse.Namespace) -> dict:
    """Run one stage in this process (model loaded before the clock starts) and return its measurements."""
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from stages.common.config import build_config
    from stages.models.load import load_models
    from stages.common.progress import Progress
    from stages.io.workspace import Workspace

    ws = Workspace.open(args.workspace)
    progress = Progress(quiet=not args.verbose)
    t0 = time.perf_counter()
    models = load_models(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    _reset_peak_memory(args.device)
    timer = None
    t0 = time.perf_counter()
    if args.worker == "edit":
        from stages.edit.run import EditConfig, run_edit

        cfg = build_config(EditConfig, {"prompt": "a blue ball rolling", "name": EDIT_NAME, "device": args.device,
                                        "dtype": args.dtype, "force": True})
        result = run_edit(ws, cfg, progress, models=models)
        wall = time.perf_counter() - t0
        stats = ws.group_attrs(f"edits/{EDIT_NAME}").get("stats") or {}
        result["unet_batch"] = int(stats.get("unet_batch", 1))
        group = f"edits/{EDIT_NAME}"
    else:
        from stages.invert import InvertConfig, PhaseTimer, run_invert

        cfg = build_config(InvertConfig, {
            "prompt": PROMPT, "subject": "red ball", "model": args.model, "steps": args.steps,
            "null_steps": args.null_steps, "device": args.device, "dtype": args.dtype,
            "plain": args.worker == "baseline", "restart": True})
        timer = PhaseTimer() if args.profile else None
        result = run_invert(ws, cfg, progress, models=models, timer=timer)
        wall = time.perf_counter() - t0
        group = "inversion"
    return {"stage": args.worker, "wall_s": wall, "load_s": load_s, "peak_gib": _peak_memory(args.device),
            "disk_mib": ws.size_bytes(group) / 2**20, "threads": torch.get_num_threads(),
            "profile": timer.steps if timer is not None else None, "result": result}


def make_workspace(path: Path, frames: int, px: int) -> None:
    """A workspace holding a generated clip and its ground-truth mask (what `vd mask` leaves)."""
    sys.path.insert(0, str(ROOT))
    from stages.io.synthetic import moving_disc
    from stages.io.workspace import Workspace

    video, masks = moving_disc(frames, px, px, seed=0)
    ws = Workspace.create(path, {"path": "bench-synthetic", "sha256": f"bench-{frames}-{px}", "frames": frames,
                                 "size": [px, px], "start": 0, "stride": 1, "fps": 8.0, "fps_out": 8.0})
    ws.write_array("video/frames", video)
    ws.write_array("masks/raw", masks)
    ws.write_array("masks/edit", masks)


def run_worker(stage: str, workspace: Path, opts: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, "--workspace", str(workspace), "--model", opts.model,
           "--steps", str(opts.steps), "--null-steps", str(opts.null_steps), "--device", opts.device,
           "--dtype", opts.dtype, "--threads", str(opts.threads)]
    cmd += ["--verbose"] if opts.verbose else []
    cmd += ["--profile"] if opts.profile else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"bench: {stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- reporting

def summarise(m: dict, steps: int) -> dict:
    """One table row from a worker's measurements.

    UNet fwd counts sample-forwards (batch entries: a batch-4 edit call is 4), GT forwards included;
    s/step is the stage's stepping loop (null-text phase, or the editing loop) divided by the steps.
    """
    r = m["result"]
    if m["stage"] == "edit":
        calls = r.get("unet_calls") or (r.get("stats") or {}).get("unet_calls") or 0
        fwd, bwd = int(calls) * int(r.get("unet_batch", 1)), 0
        loop = (r.get("timings") or {}).get("edit", m["wall_s"])
        quality = ""
    else:
        c = r["counts"]["this_run"]
        fwd = c["unet_forwards"] + c["unet_gt_forwards"]
        bwd = c["backwards"]
        loop = (r.get("timings") or {}).get("null_text_s", m["wall_s"])
        rec = r.get("recon") or {}
        quality = (f"PSNR {rec.get('psnr', float('nan')):.2f} dB, "
                   f"latent MSE {rec.get('latent_mse', float('nan')):.4e}")
    return {"stage": m["stage"], "wall_s": m["wall_s"], "load_s": m.get("load_s", 0.0), "loop_s": loop,
            "per_step_s": loop / steps, "unet_fwd": fwd, "unet_bwd": bwd, "peak_gib": m["peak_gib"],
            "disk_mib": m["disk_mib"], "quality": quality}


def profile_summary(steps: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per phase over the middle null-text steps (STDG active; all steps if fewer than 3),
    plus "other" (step wall time not inside a phase) and "total"."""
    mid = steps[1:-1] if len(steps) >= 3 else steps
    if not mid:
        return {}
    out = {p: sum(s.get(p, 0.0) for s in mid) / len(mid) for p in PHASES}
    out["total"] = sum(s.get("total", 0.0) for s in mid) / len(mid)
    out["other"] = max(out["total"] - sum(out[p] for p in PHASES), 0.0)
    return out


def format_profile(profiles: dict[str, dict[str, float]]) -> str:
    """Markdown table: per-phase mean seconds of one middle null-text step, per stage (column)."""
    names = [n for n in ("invert", "baseline") if profiles.get(n)]
    if not names:
        return ""
    head = "| phase | " + " | ".join(f"{n} s/step | {n} %" for n in names) + " |"
    lines = ["Profile of one null-text step (mean over the middle steps, where STDG runs):", "", head,
             "|---|" + "---|---|" * len(names)]
    for phase in PHASES + ("other", "total"):
        cells = []
        for n in names:
            p = profiles[n]
            share = 100.0 * p.get(phase, 0.0) / p["total"] if p.get("total") else 0.0
            cells.append(f"{p.get(phase, 0.0):.3f} | {share:.0f}")
        if phase != "total" and all(profiles[n].get(phase, 0.0) == 0.0 for n in names):
            continue
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(opt_ws: Path, base_ws: Path) -> dict[str, float]:
    """How far the baseline's stored results are from the optimised run's (max abs and relative)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from stages.io.workspace import Workspace

    a, b = Workspace.open(opt_ws), Workspace.open(base_ws)
    out = {}
    for name in ("recon_latents", "null_embeddings"):
        x, y = a.read(f"inversion/{name}"), b.read(f"inversion/{name}")
        diff = float(np.abs(x - y).max())
        out[name] = diff
        out[f"{name}_rel"] = diff / max(float(np.abs(x).max()), 1e-12)
    return out


def format_report(meta: dict[str, Any], rows: list[dict], profiles: dict[str, dict[str, float]] | None = None,
                  diff: dict[str, float] | None = None) -> str:
    """The Markdown block appended to RESULTS.md: heading, table, baseline ratio, optional profile."""
    lines = [f"### {meta['when']} | {meta['device']} | commit {meta['commit']} | {meta['settings']}", "",
             "| stage | wall s | load s | s/step | UNet fwd | UNet bwd | peak GiB | stage data MiB | reconstruction |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['wall_s']:.1f} | {r['load_s']:.1f} | {r['per_step_s']:.2f} "
                     f"| {r['unet_fwd']} | {r['unet_bwd']} | {r['peak_gib']:.2f} | {r['disk_mib']:.1f} "
                     f"| {r['quality']} |")
    by = {r["stage"]: r for r in rows}
    if "baseline" in by and "invert" in by:
        base, opt = by["baseline"], by["invert"]
        lines += ["", f"Baseline / optimised inversion: {base['wall_s'] / opt['wall_s']:.2f}x stage wall time "
                      f"({base['loop_s'] / opt['loop_s']:.2f}x the null-text loop)."]
        if profiles and profiles.get("baseline") and profiles.get("invert"):
            pb, po = profiles["baseline"], profiles["invert"]
            gc_share = pb.get("gc", 0.0) / pb["total"] if pb.get("total") else 0.0
            lines[-1] += (f" Per middle step {pb['total'] / po['total']:.2f}x, "
                          f"{(pb['total'] - pb.get('gc', 0.0)) / po['total']:.2f}x without the baseline's "
                          f"gc.collect ({100 * gc_share:.0f}% of its step).")
        if diff:
            lines.append(f"Baseline vs optimised results: max |diff| recon latents {diff['recon_latents']:.2e} "
                         f"(relative {diff['recon_latents_rel']:.1e}), null embeddings {diff['null_embeddings']:.2e} "
                         f"(relative {diff['null_embeddings_rel']:.1e}).")
    if profiles:
        block = format_profile(profiles)
        if block:
            lines += ["", block.rstrip("\n")]
    return "\n".join(lines) + "\n"


# `--batch`: `vd batch` throughput on generated clips (tiny model), 1 and 2 workers
BATCH = dict(clips=4, frames=4, px=64, steps=4, null_steps=2)


def batch_manifest(folder: Path, clips: int, args: argparse.Namespace) -> Path:
    """Write `clips` generated clips and a manifest running mask -> invert -> edit -> eval on each."""
    sys.path.insert(0, str(ROOT))
    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    lines = ["defaults:", f"  model: {args.model}", f"  frames: {args.frames}", f"  size: {args.px}",
             f"  invert: {{steps: {args.steps}, null_steps: {args.null_steps}}}",
             f"  box: [{args.px // 4}, {args.px // 4}, {3 * args.px // 4}, {3 * args.px // 4}]", "  box_only: true",
             f"  prompt: \"{PROMPT}\"", "  subject: red ball", "  edits: [\"blue cube\"]",
             "  eval: {metrics: [psnr, ssim, warp]}", "clips:"]
    for k in range(clips):
        video, _ = moving_disc(args.frames, args.px, args.px, seed=k)
        write_mp4(folder / f"clip{k}.mp4", video, fps=8.0)
        lines.append(f"  - clip: clip{k}.mp4")
    path = folder / "batch.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_batch_bench(args: argparse.Namespace, workers: int, manifest: Path, out: Path) -> dict:
    """One `vd batch` run in its own process; the row for the report."""
    cmd = [sys.executable, "-m", "vdcli.app", "batch", str(manifest), "--out", str(out), "--workers", str(workers),
           "--engine", args.engine, "-q", "--json"]
    if args.threads:
        cmd += ["--threads-per-worker", str(args.threads)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"vd batch failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    rep = json.loads(done.stdout)
    per_worker = rep["model_loads"]["per_worker"]
    return {"engine": args.engine, "workers": workers, "threads": per_worker[0]["threads"] if per_worker else None,
            "clips": rep["counts"]["done"], "batch_s": rep["seconds"], "process_s": wall,
            "clips_per_hour": rep["clips_per_hour"], "loads": rep["model_loads"]["total"],
            "loads_per_worker": [w["model_loads"] for w in per_worker]}


def format_batch(meta: dict[str, Any], rows: list[dict]) -> str:
    """The Markdown block of a `--batch` run."""
    lines = [f"### {meta['when']} | {meta['device']} | commit {meta['commit']} | vd batch: {meta['settings']}", "",
             "| engine | workers | threads/worker | clips | batch s | process s | clips/hour | model loads (per worker) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['workers']} | {r['threads']} | {r['clips']} | {r['batch_s']:.1f} "
                     f"| {r['process_s']:.1f} | {r['clips_per_hour']:.0f} | {r['loads']} "
                     f"({', '.join(map(str, r['loads_per_worker']))}) |")
    return "\n".join(lines) + "\n"


def batch_main(args: argparse.Namespace) -> None:
    """`--batch`: clips/hour of `vd batch` with 1 and 2 workers, and the model loads counted."""
    for key in ("frames", "px", "steps", "null_steps"):
        if getattr(args, key) is None:
            setattr(args, key, BATCH[key])
    args.model = SIZES[args.size]["model"]
    with tempfile.TemporaryDirectory(prefix="vd-bench-batch-") as tmp:
        manifest = batch_manifest(Path(tmp), args.clips, args)
        rows = [run_batch_bench(args, n, manifest, Path(tmp) / f"out{n}") for n in (1, 2)]
    meta = {"when": utc_stamp(),
            "device": device_name(args.device), "commit": commit_id(),
            "settings": (f"{args.model}, {args.clips} clips, {args.frames} frames, {args.px}px, {args.steps} steps, "
                         f"{args.null_steps} null steps, 1 edit + eval per clip")}
    report = format_batch(meta, rows)
    print(report)
    if not args.no_record:
        record(report)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def utc_stamp() -> str:
    """The time a result was measured, as every RESULTS.md section names it."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def record(text: str) -> None:
    """Append one section to bench/RESULTS.md."""
    with RESULTS.open("a") as fh:
        fh.write("\n" + text.lstrip("\n"))


def full_size_args(ap: argparse.ArgumentParser, steps: int, null_steps: int, steps_help: str) -> None:
    """The options of the full-size GPU scripts (bench/gpu.py, bench/smoke_gpu.py): the model and clip."""
    ap.add_argument("--model", default="sd15-random")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--null-steps", type=int, default=null_steps)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")


def commit_id() -> str:
    """Short HEAD commit, marked when tracked files have uncommitted changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+uncommitted" if git("status", "--porcelain", "--untracked-files=no") else "")


def settings_text(args: argparse.Namespace, threads: int) -> str:
    preset = SIZES[args.size]
    reduced = any(getattr(args, k) != preset[k] for k in ("frames", "px", "steps", "null_steps"))
    label = f"size {args.size}" + (" REDUCED" if reduced else "")
    return (f"{label} ({args.model}, {args.frames} frames, {args.px}px, {args.steps} steps, "
            f"{args.null_steps} null steps, dtype {args.dtype}, {threads} thread{'s' if threads != 1 else ''})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--null-steps", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--px", type=int)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU: the tiny model is overhead-"
                                                "bound and one thread is robust to other load; 0 = torch default)")
    ap.add_argument("--profile", action="store_true", help="time the phases of every null-text step")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unoptimised baseline inversion")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--batch", action="store_true", help="measure `vd batch` clips/hour with 1 and 2 workers "
                                                          "(tiny model, generated clips) and count the model loads")
    ap.add_argument("--clips", type=int, default=BATCH["clips"], help="clips in the --batch manifest")
    ap.add_argument("--engine", choices=("local", "ray"), default="local", help="--batch engine")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workspace", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.worker:
        print(json.dumps(worker(args), default=str))
        return
    if args.batch:
        batch_main(args)
        return
    preset = SIZES[args.size]
    for key in ("steps", "null_steps", "frames", "px"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.model = preset["model"]
    measured, profiles, diff = [], {}, None
    with tempfile.TemporaryDirectory(prefix="vd-bench-") as tmp:
        opt_ws, base_ws = Path(tmp) / "opt", Path(tmp) / "base"
        make_workspace(opt_ws, args.frames, args.px)
        measured.append(run_worker("invert", opt_ws, args))
        measured.append(run_worker("edit", opt_ws, args))
        if not args.no_baseline:
            make_workspace(base_ws, args.frames, args.px)
            measured.append(run_worker("baseline", base_ws, args))
            diff = compare(opt_ws, base_ws)
    rows = [summarise(m, args.steps) for m in measured]
    for m in measured:
        if m.get("profile"):
            profiles[m["stage"]] = profile_summary(m["profile"])
    meta = {"when": utc_stamp(),
            "device": device_name(args.device), "commit": commit_id(),
            "settings": settings_text(args, int(measured[0].get("threads", args.threads)))}
    report = format_report(meta, rows, profiles, diff)
    print(report)
    if not args.no_record:
        record(report)


if __name__ == "__main__":
    main()
