"""What `vd batch` tells: per-worker status lines while it runs, and the batch report at the end (counts,
failures, model loads, throughput, the exported files and the `vd eval --compare` table over the clips)."""

from __future__ import annotations

import threading
from typing import Any, Callable

from stages.batch.manifest import Manifest
from stages.common.progress import Progress


def status_printer(progress: Progress) -> Callable[[dict[str, Any]], None]:
    """Per-worker status lines from worker events."""
    lock = threading.Lock()

    def show(event: dict[str, Any]) -> None:
        who = f"[worker {event.get('worker')}] {event.get('clip')}"
        kind = event.get("kind")
        if kind == "note":
            line = str(event.get("message"))
        elif kind == "start":
            line = f"{who}: {event.get('stage')} ..."
        elif kind == "end":
            line = f"{who}: {event.get('stage')} {event.get('status')} ({float(event.get('seconds') or 0):.1f} s)"
            if event.get("why"):
                line += f": {event['why']}"
        else:
            line = f"{who}: FAILED in {event.get('stage')}: {event.get('error')}"
        with lock:
            progress.log(line)

    return show


def build_report(manifest: Manifest, engine: str, only: list[str], out: str, results: list[dict[str, Any]],
                 stats: list[dict[str, Any]], workers: int, seconds: float) -> dict[str, Any]:
    """The batch report over the clips' results (in manifest order) and the workers' stats."""
    done = [r for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] != "done"]
    loads = sum(int(r.get("model_loads") or 0) for r in results)
    return {
        "manifest": str(manifest.path), "engine": engine, "workers": workers, "out": out,
        "only": list(only), "clips": results,
        "counts": {"clips": len(results), "done": len(done), "failed": len(failed),
                   "stages_run": sum(len(r["run"]) for r in results),
                   "stages_skipped": sum(len(r["skipped"]) for r in results)},
        "failed": [{"name": r["name"], "stage": r.get("stage"), "error": r["error"], "log": r.get("log")}
                   for r in failed],
        "model_loads": {"total": loads, "per_worker": stats},
        "seconds": round(seconds, 2),
        "clips_per_hour": round(len(done) * 3600.0 / seconds, 1) if seconds > 0 else None,
        "exports": {r["name"]: r["exports"] for r in results if r.get("exports")},
        "compare": compare_table(results),
    }


def export_lines(report: dict[str, Any]) -> list[str]:
    """One line per exported file of the batch report: "CLIP: export EDIT -> PATH"."""
    return [f"{clip}: export {edit} -> {path}" for clip, files in (report.get("exports") or {}).items()
            for edit, path in files.items()]


def compare_table(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The `vd eval --compare` table (same shape and grouping) over the clips' eval results."""
    from stages.evaluate import compare_groups

    per_clip = {r["workspace"]: r["metrics"] for r in results if r.get("metrics")}
    if not per_clip:
        return None
    return {"clips": list(per_clip), "groups": compare_groups(per_clip), "per_clip": per_clip}
