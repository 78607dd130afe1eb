"""`vd batch MANIFEST`: mask -> invert -> edit -> eval over many clips, locally or on a Ray cluster."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vdcli.common import JsonOpt, QuietOpt, app, run

_RUN, _OUT = "Workers", "Output"


@app.command("batch")
def batch_command(
    manifest: Annotated[Path, typer.Argument(metavar="MANIFEST", show_default=False,
                                             help="YAML (or .jsonl) manifest: `defaults:` and `clips:`.")],
    engine: Annotated[str, typer.Option("--engine", rich_help_panel=_RUN,
                                        help="local (in this process) or ray (Ray actors).")] = "local",
    address: Annotated[Optional[str], typer.Option(
        "--address", rich_help_panel=_RUN,
        help="Ray cluster to join: auto (a running one) or ray://HOST:10001; default: start a local one.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", "-w", rich_help_panel=_RUN,
        help="Workers, each holding one model (at most one per clip). \\[default: 1 locally; Ray: one per "
             "GPU slot, else one per node]")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(
        "--gpus-per-worker", rich_help_panel=_RUN,
        help="GPUs each Ray worker asks for. \\[default: 1 when a clip sets device: cuda, 0 when every clip "
             "sets device: cpu, else 1 when the cluster has GPUs now]")] = None,
    threads_per_worker: Annotated[Optional[int], typer.Option(
        "--threads-per-worker", rich_help_panel=_RUN,
        help="Torch threads per worker; on Ray also the CPUs each actor asks for. "
             "\\[default: local cores / workers; Ray 2]")] = None,
    schedule_timeout: Annotated[float, typer.Option(
        "--schedule-timeout", metavar="SECONDS", rich_help_panel=_RUN,
        help="Ray: stop with an error when no worker has started after this long.")] = 300.0,
    out: Annotated[str, typer.Option(
        "--out", "-o", rich_help_panel=_OUT,
        help="Folder or fsspec URL (s3://, gs://, az://, file://) for the workspaces (NAME.vd).")] = "runs",
    only: Annotated[Optional[str], typer.Option(
        "--only", metavar="STAGES", rich_help_panel=_RUN,
        help="Comma list of the stages to run: mask,invert,edit,export,eval. \\[default: all]")] = None,
    retry: Annotated[int, typer.Option(
        "--retry", rich_help_panel=_RUN,
        help="Retries of a clip after a transient failure (an unexpected error; on Ray, a lost worker). "
             "Out of memory is never retried.")] = 0,
    scratch: Annotated[Optional[str], typer.Option(
        "--scratch", rich_help_panel=_OUT,
        help="Local scratch folder for workspaces synced to a URL. \\[default: TMP/vd-batch-USER]")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", rich_help_panel=_RUN,
        help="Show the stages' own lines (on Ray: the actors' output) as they run.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run many clips from one manifest; skips stages already complete, so a rerun resumes the batch.

    Exit code 0 when every clip finished, 1 when some failed (the report names them).
    """

    def work(progress: Any) -> dict[str, Any]:
        from stages.batch import STAGES, BatchOptions, check_options, load_manifest, run_batch

        stages = [s.strip() for s in only.split(",") if s.strip()] if only else list(STAGES)
        opts = BatchOptions(engine=engine, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                            threads_per_worker=threads_per_worker, out=out, only=stages, retry=retry,
                            scratch=scratch, schedule_timeout=schedule_timeout, verbose=verbose)
        check_options(opts)  # before the manifest: bad flags are usage errors
        return run_batch(load_manifest(manifest), opts, progress)

    result = run(work, json_out, quiet, _print_human)
    failed = result.get("failed") or []
    if failed:
        names = ", ".join(f"{f['name']} ({f['error']})" for f in failed)
        print(f"vd: error: {len(failed)} of {result['counts']['clips']} clip(s) failed: {names}",
              file=sys.stderr, flush=True)
        raise typer.Exit(1)


def _print_human(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from stages.batch.report import export_lines
    from vdcli.commands.eval import print_compare

    table = Table(title=f"vd batch: {result['counts']['done']}/{result['counts']['clips']} clip(s) done "
                        f"in {result['seconds']:.0f} s, {result['model_loads']['total']} model load(s)")
    for col in ("clip", "status", "ran", "skipped", "seconds", "workspace / error"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for clip in result["clips"]:
        table.add_row(clip["name"], clip["status"], ",".join(clip["run"]) or "-", ",".join(clip["skipped"]) or "-",
                      f"{clip['seconds']:.1f}" if clip.get("seconds") is not None else "-",
                      clip["workspace"] if clip["status"] == "done" else str(clip["error"]))
    console = Console()
    console.print(table)
    for clip in result["clips"]:  # why each stage ran (what changed since the last run)
        for stage, info in clip["stages"].items():
            if info.get("status") == "run" and info.get("why"):
                console.print(f"{clip['name']}: {stage} ran: {info['why']}", markup=False, highlight=False,
                              soft_wrap=True)
    for line in export_lines(result):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if result.get("compare"):
        print_compare(result["compare"])
