"""`make bench-gpu`: the full-size inversion on one GPU under each checkpointing level; appends to bench/RESULTS.md
the measured peak against the predicted one, the time per step, the memory outside torch (the CUDA context,
against `--plan-for`'s 0.5 GiB allowance) and whether the levels give the same results.

    python bench/gpu.py                      # sd15-random, 16 x 512 px, bf16, 8 x 10 null steps: off, blocks, layers
    python bench/gpu.py --levels off,layers,auto --steps 10
    python bench/gpu.py --device cpu --model tiny --frames 2 --px 64 --steps 2 --null-steps 1 --no-record  # smoke

The model loads once (random weights: the same compute and memory as real ones); each run inverts a fresh
copy of a generated clip (a moving disc and its exact mask) with `vd invert`'s own entry point
(stages.invert.run_invert), `--checkpointing LEVEL`. `off` runs a second time (unless --no-repeat) so the
equality of `blocks` and `layers` can be read against the run-to-run difference of the GPU kernels. Peak memory:
torch.cuda.max_memory_allocated over the run, model resident (the prediction includes the weights too);
predicted: stages.invert.plan.plan_invert's memory.peak for that level (stages.models.memory). Time per
step: the middle steps' mean (inversion/step_stats), next to the dry run's estimate for this GPU (worst
case of --null-steps inner iterations, and scaled to the measured mean). Fewer steps than 50 cost the same per step;
the run stops starting new levels once --budget-s is spent (8 minutes on one H100 in all, load included).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench as B  # noqa: E402  (the shared harness: make_workspace, peak memory, commit id)

PROMPT = "a red ball rolling over a textured floor"
COMPARED = ("recon_latents", "null_embeddings", "stdg/guidance")
GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.full_size_args(ap, 8, 10, "DDIM steps (the per-step cost does not depend on it)")
    ap.add_argument("--levels", default="off,blocks,layers", help="comma-separated --checkpointing levels")
    ap.add_argument("--no-repeat", action="store_true", help="do not run `off` a second time (noise floor)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no new run after this many seconds")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    from stages.invert.checkpointing import MODES

    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    bad = [x for x in levels if x not in MODES]
    if bad or not levels:
        ap.error(f"--levels: unknown level(s) {bad or levels}; use {', '.join(MODES)}")
    if args.frames < 1 or args.px < 64 or args.px % 64 or args.steps < 2 or args.null_steps < 0:
        ap.error("--frames >= 1, --px a multiple of 64, --steps >= 2, --null-steps >= 0")
    args.runs = levels + ([] if args.no_repeat or "off" not in levels else ["off"])
    return args


def non_torch_bytes(device: str) -> int | None:
    """Device memory this process uses outside torch's allocator (CUDA context, library workspaces)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(total - free - torch.cuda.memory_reserved())


def one_run(ws_path: Path, level: str, models: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Invert a fresh clip at `level`; measured and predicted peak, seconds per middle step, the checkpointing used."""
    import numpy as np
    import torch

    from stages.common.config import build_config
    from stages.common.progress import Progress
    from stages.invert import STAT_COLUMNS, InvertConfig, run_invert
    from stages.invert.plan import forward_equivalents, plan_invert
    from stages.io.workspace import Workspace

    B.make_workspace(ws_path, args.frames, args.px)
    ws = Workspace.open(ws_path)
    cfg = build_config(InvertConfig, {"prompt": PROMPT, "subject": "red ball", "model": args.model,
                                      "steps": args.steps, "null_steps": args.null_steps, "device": args.device,
                                      "dtype": args.dtype, "checkpointing": level})
    plan = plan_invert(ws, cfg)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    B._reset_peak_memory(args.device)
    t0 = time.perf_counter()
    run_invert(ws, cfg, Progress(quiet=not args.verbose), models=models)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = B._peak_memory(args.device) * GIB
    stats = np.asarray(ws.read("inversion/step_stats"))
    middle = stats[1:-1] if len(stats) > 2 else stats
    seconds = float(middle[:, STAT_COLUMNS.index("seconds")].mean())
    inner = float(middle[:, STAT_COLUMNS.index("inner")].mean())
    used = (ws.group_attrs("inversion").get("checkpointing") or {}).get("mode")
    est = plan["time"]["seconds_per_step"]
    est_at_inner = None
    if est is not None:  # the estimate's forward-equivalents with the measured mean of inner iterations
        from stages.invert.passes import clip_windows

        windows = clip_windows(args.frames, cfg, 32)
        fe = [forward_equivalents(dataclasses.replace(cfg, null_steps=n), windows, used != "off")["middle_step"]
              for n in (0, 1)]
        est_at_inner = est * (fe[0] + inner * (fe[1] - fe[0])) / plan["time"]["forward_equivalents_per_step"]
    predicted = plan["memory"]["peak"].get(used or level)
    return {"level": level, "used": used, "wall_s": wall, "peak": peak, "predicted": predicted,
            "s_per_step": seconds, "inner": inner, "est_s_per_step": est, "est_at_inner": est_at_inner,
            "non_torch": non_torch_bytes(args.device), "ws": ws_path}


def differences(a: Path, b: Path) -> dict[str, float]:
    """Max |a - b| over the compared arrays, and the largest relative difference; bitwise equality."""
    import numpy as np

    from stages.io.workspace import Workspace

    wa, wb = Workspace.open(a), Workspace.open(b)
    out = {"max_abs": 0.0, "max_rel": 0.0, "bitwise": True}
    for name in COMPARED:
        x, y = (np.asarray(w.read(f"inversion/{name}"), dtype=np.float64) for w in (wa, wb))
        d = float(np.abs(x - y).max()) if x.size else 0.0
        out["max_abs"] = max(out["max_abs"], d)
        out["max_rel"] = max(out["max_rel"], d / max(float(np.abs(x).max()), 1e-12))
        out["bitwise"] = out["bitwise"] and bool(np.array_equal(x, y))
    return out


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def g(n: float | None) -> str:
        return "n/a" if n is None else f"{n / GIB:.2f}"

    def s(n: float | None) -> str:
        return "n/a" if n is None else f"{n:.2f}"

    lines = [f"\n### {meta['stamp']} | {meta['device']} | commit {meta['commit']} | bench/gpu.py: {meta['settings']}",
             "", "| run | checkpointing used | measured peak GiB | predicted GiB | measured / predicted | s/step "
             f"(middle) | mean inner it. | estimate s/step ({meta['null_steps']} it.) | estimate at mean it. | outside torch GiB | "
             "vs first off: max abs (rel), bitwise |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['level']} | failed: {r['error']} |" + " |" * 9)
            continue
        ratio = f"{r['peak'] / r['predicted']:.3f}" if r["predicted"] else "n/a"
        diff = r.get("diff")
        eq = "(reference)" if diff is None else f"{diff['max_abs']:.2e} ({diff['max_rel']:.1e}), " \
                                                f"{'yes' if diff['bitwise'] else 'no'}"
        lines.append(f"| {r['level']} | {r['used']} | {g(r['peak'])} | {g(r['predicted'])} | {ratio} | "
                     f"{s(r['s_per_step'])} | {r['inner']:.1f} | {s(r['est_s_per_step'])} | {s(r['est_at_inner'])} | "
                     f"{g(r['non_torch'])} | {eq} |")
    lines += ["", f"Model load {meta['load_s']:.0f} s (not in the rows); whole bench {meta['total_s']:.0f} s."
              + (f" Skipped after the {meta['budget_s']:.0f} s budget: {', '.join(meta['skipped'])}."
                 if meta["skipped"] else "")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here (use --device cpu for the smoke test)", file=sys.stderr)
        return 2
    from stages.models.load import load_models

    t_begin = time.perf_counter()
    models = load_models(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t_begin
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vd-bench-gpu-") as tmp:
        for k, level in enumerate(args.runs):
            if time.perf_counter() - t_begin > args.budget_s:
                skipped.append(level)
                continue
            try:
                row = one_run(Path(tmp) / f"run{k}-{level}", level, models, args)
            except Exception as exc:  # record and go on: one level failing says something too
                row = {"level": level, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            rows.append(row)
            print(f"bench/gpu.py: {level} done ({time.perf_counter() - t_begin:.0f} s)", file=sys.stderr, flush=True)
        done = [r for r in rows if "error" not in r]
        first_off = next((r for r in done if r["level"] == "off"), done[0] if done else None)
        for r in done:
            if r is not first_off and first_off is not None:
                r["diff"] = differences(first_off["ws"], r["ws"])
    settings = (f"{args.model}, {args.frames} frames, {args.px} px, {args.dtype}, {args.steps} steps, "
                f"{args.null_steps} null steps, torch {torch.__version__}")
    meta = {"stamp": B.utc_stamp(),
            "device": B.device_name(args.device) + ("" if args.device.startswith("cuda") else f" ({platform.machine()})"),
            "commit": B.commit_id(), "settings": settings, "load_s": load_s, "null_steps": args.null_steps,
            "total_s": time.perf_counter() - t_begin, "budget_s": args.budget_s, "skipped": skipped}
    text = report(rows, meta)
    print(text)
    if not args.no_record:
        B.record(text)
    return 0 if done and len(done) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
