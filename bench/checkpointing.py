"""Time cost of `vd invert --checkpointing blocks|layers` on the full SD1.5 + AnimateDiff v3 architecture (CPU).

    python bench/checkpointing.py                      # 128 px, 2 frames, 1 thread, 2 repeats; prints the rows
    python bench/checkpointing.py --record             # and appends them to bench/RESULTS.md

Random weights (`sd15-random`), float32 on the CPU. Times, with and without checkpointing: one STDG grad pass
(STDG.gradient: recorded forward cut after up_blocks.2 + one backward to z) and one null-text iteration
(forward with phi requiring grad + backward), in process CPU seconds, the best of `--repeats` interleaved
runs; checks that both give the same
gradients. Also times a no-grad forward: with ARCHITECTURE.md §7's 1.1 TFLOP per 512 px frame (scaled by
the latent tokens) that is the CPU throughput figure `vd invert --dry-run` uses (an estimate).
Memory is bench/memory.py's job (its "+blocks" and "+layers" rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "RESULTS.md"

import bench as B  # noqa: E402  (the shared harness: commit id)
T_STEP = 501


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(process CPU seconds, result) of one call: on a shared machine the CPU time of a single-threaded run
    is far steadier than its wall time (other jobs' load only stretches the latter)."""
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def rel_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)


def measure(px: int, frames: int, repeats: int) -> dict[str, Any]:
    import torch

    from stages.invert import DEFAULT_STDG, STDG, Passes
    from stages.invert.checkpointing import checkpointed
    from stages.models.memory import LEVELS
    from stages.method.control.controller import AttentionController, install
    from stages.method.guidance import RegionMasks, needs_terms
    from stages.models.load import load_models
    from stages.models.ops import encode_text, unet_eps

    t0 = time.perf_counter()
    models = load_models("sd15-random", device="cpu")
    load_s = time.perf_counter() - t0
    h = w = px // 8
    gen = torch.Generator().manual_seed(0)
    z_star = torch.randn(1, frames, 4, h, w, generator=gen)
    z_t = z_star + 0.1 * torch.randn(z_star.shape, generator=gen)
    mask = torch.zeros(frames, px, px, dtype=torch.bool)
    mask[:, px // 4: 3 * px // 4, px // 4: 3 * px // 4] = True
    controller = install(models.unet, AttentionController())
    c_src = encode_text(models, ["a red ball rolling on the floor"]).expand(frames, -1, -1)
    neg = encode_text(models, [""])
    coef = DEFAULT_STDG["foreground"]
    stdg = STDG(Passes(models), controller, RegionMasks(mask, (h, w)), c_src, coef)
    targets = stdg.targets(z_star, T_STEP, needs_terms(coef))

    def forward() -> Any:
        with torch.no_grad():
            return unet_eps(models, z_t, T_STEP, c_src)

    def null_text() -> Any:
        phi = neg.repeat(frames, 1, 1).requires_grad_(True)
        out = unet_eps(models, z_t, T_STEP, phi)
        ((out - z_star) ** 2).mean().backward()
        return phi.grad

    row: dict[str, Any] = {"load_s": load_s}
    row["forward_s"] = min(timed(forward)[0] for _ in range(repeats))
    for _ in range(repeats):  # interleaved, best of `repeats` each
        for mode in LEVELS:
            with checkpointed(models.unet, controller, mode):
                for name, fn in (("stdg", lambda: stdg.gradient(z_t, T_STEP, targets)[0]), ("null", null_text)):
                    seconds, row[f"{name}_{mode}"] = timed(fn)
                    row[f"{name}_{mode}_s"] = min(seconds, row.get(f"{name}_{mode}_s", float("inf")))
    for name in ("stdg", "null"):
        off = row.pop(f"{name}_off")
        for mode in LEVELS[1:]:
            row[f"{name}_{mode}_diff"] = rel_diff(off, row.pop(f"{name}_{mode}"))
    tflop = 1.1 * h * w / 4096 * frames
    row["cpu_gflops"] = tflop * 1000 / row["forward_s"]
    return row


def report(row: dict[str, Any], px: int, frames: int, threads: int) -> list[str]:
    from stages.models.memory import LEVELS

    def cells(name: str) -> str:
        off = row[f"{name}_off_s"]
        def cell(m: str) -> str:
            s = row[f"{name}_{m}_s"]
            return f"{s:.2f} (+{100 * (s / off - 1):.0f}%) | {row[f'{name}_{m}_diff']:.1e}"

        return f"{off:.2f} | " + " | ".join(cell(m) for m in LEVELS[1:])

    head = " | ".join(f"{m} CPU s (time cost) | {m} max relative difference" for m in LEVELS[1:])
    return [
        f"| pass | off CPU s | {head} |",
        "|---|---|" + "---|---|" * (len(LEVELS) - 1),
        f"| STDG grad pass (forward cut after up_blocks.2 + backward to z) | {cells('stdg')} |",
        f"| null-text iteration (forward + backward to phi) | {cells('null')} |",
        "",
        f"No-grad forward {row['forward_s']:.2f} CPU s: {row['cpu_gflops']:.0f} GFLOP/s at {threads} thread(s) with "
        f"ARCHITECTURE.md §7's 1.1 TFLOP per 512 px frame scaled to {px} px x {frames} frames (an estimate: "
        f"the FLOP figure is for 512 px). Model load {row['load_s']:.0f} s (not in the rows).",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--px", type=int, default=128)
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="append the rows to bench/RESULTS.md")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    row = measure(args.px, args.frames, args.repeats)
    lines = report(row, args.px, args.frames, args.threads)
    print("\n".join(lines))
    if args.record:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        head = (f"\n### {stamp} | CPU {platform.machine()} x{os.cpu_count()} | commit {B.commit_id()} | "
                f"bench/checkpointing.py: sd15-random, fp32, {args.px} px, {args.frames} frames, "
                f"{args.threads} thread(s), process CPU seconds, best of {args.repeats}\n")
        with RESULTS.open("a") as fh:
            fh.write(head + "\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
