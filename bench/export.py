"""Benchmark `vd export` at 1920x1080 and append the figures to bench/RESULTS.md (issue 27).

    .venv/bin/python bench/export.py                # about 3 minutes on 2 CPU cores; appends a dated section
    .venv/bin/python bench/export.py --no-record    # print only

Rows: (1) 16 frames at 1920x1080 from a 512x512 crop workspace, h264 (crf 18), the span's audio re-encoded:
wall time; (2) `--whole-clip` of a 40-frame and of a 300-frame 1080p clip, h264: wall time and peak RSS,
which must stay flat in the clip's length (frames stream one at a time). Each export runs in its own
process; the peak is that process's RSS high-water mark (Linux VmHWM) from just before run_export on.
The clips are generated as tests/test_export.py makes its clip (libx264, 30000/1001 fps, bt709, an AAC tone);
the edit is the workspace's frames with the masked region painted, laid out as `vd edit` stores it (no model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SIZE = (1080, 1920)  # (height, width)
BOX = "160,128,352,384"  # the edited object in the 512x512 workspace


def make_clip(path: Path, frames: int) -> Path:
    """A 1080p h264 clip of `frames` frames with a stereo AAC tone as long as it (the clip tests/test_export.py
    makes, at 1920x1080 and without rotation)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_export import make_clip as make_test_clip

    return make_test_clip(path, width=SIZE[1], height=SIZE[0], frames=frames, rotation=0, audio=True)


def make_workspace(clip: Path, dest: Path, frames: int = 16) -> Path:
    """`vd mask` (a box, no SAM2) at 512x512 crop, plus an edit painted into the mask as `vd edit` stores it."""
    from stages.common.progress import Progress
    from stages.io.workspace import Workspace
    from stages.mask.run import MaskConfig, run_mask

    run_mask(str(clip), dest, MaskConfig(frames=frames, size="512", box=BOX, box_only=True), Progress(quiet=True))
    ws = Workspace.open(dest)
    edit = ws.read("video/frames").copy()
    edit[ws.read("masks/edit") > 0] = (230, 40, 190)
    ws.write_array("edits/bench/frames", edit)
    ws.update_attrs("edits/bench", prompt="bench", status="done", params={"prompt": "bench"})
    return dest


def worker(workspace: str, output: str, whole_clip: bool) -> dict:
    """One export in this process: wall time and the peak RSS from just before it."""
    from stages.export import ExportConfig, run_export

    try:
        Path("/proc/self/clear_refs").write_text("5")  # start the VmHWM window here
    except OSError:
        pass
    t0 = time.perf_counter()
    result = run_export(workspace, ExportConfig(output=output, whole_clip=whole_clip, force=True))
    seconds = time.perf_counter() - t0
    peak = next((int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                 if line.startswith("VmHWM:")), float("nan"))
    return {"seconds": seconds, "peak_mb": peak, "frames": result["frames"], "torch": "torch" in sys.modules}


def run_worker(workspace: Path, output: Path, whole_clip: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(workspace), str(output)] + (["--whole-clip"] if whole_clip else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"bench/export.py: the export failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_rows(meta: dict, rows: list[dict]) -> str:
    """The Markdown section appended to bench/RESULTS.md."""
    lines = [f"## vd export at 1080p (issue 27; {meta['when']}, commit {meta['commit']}, {meta['device']})", "",
             meta["note"], "",
             "| case | output frames | seconds | peak RSS MB |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['frames']} | {r['seconds']:.1f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-record", action="store_true", help="print the rows, do not append them")
    parser.add_argument("--worker", nargs=2, metavar=("WS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--whole-clip", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="a sentence on the machine's load, put under the heading")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.whole_clip)))
        return
    from bench import commit_id, record, utc_stamp

    rows = []
    with tempfile.TemporaryDirectory(prefix="vd-bench-export-") as tmp:
        folder = Path(tmp)
        for length in (40, 300):
            clip = make_clip(folder / f"clip{length}.mp4", length)
            ws = make_workspace(clip, folder / f"ws{length}.vd")
            if length == 40:
                r = run_worker(ws, folder / "span.mp4", False)
                rows.append({"case": "16 frames of a 512x512 crop workspace, h264 crf 18, span audio", **r})
            r = run_worker(ws, folder / f"whole{length}.mp4", True)
            rows.append({"case": f"--whole-clip of a {length}-frame clip (16 edited), h264 crf 18, audio copied", **r})
            clip.unlink()
    meta = {"when": utc_stamp(), "commit": commit_id(),
            "device": f"CPU {platform.machine()} x{os.cpu_count()}",
            "note": args.note or "1920x1080 source, 30000/1001 fps, stereo AAC; one process per export."}
    text = format_rows(meta, rows)
    print(text)
    if not args.no_record:
        record(text)


if __name__ == "__main__":
    main()
