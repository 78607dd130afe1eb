"""`vd eval`: score the reconstruction and the edits of a workspace, or compare many workspaces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vdcli.common import JsonOpt, QuietOpt, app, run

_SEL, _CMP, _WTS = "What to score", "Many clips", "Optional metric weights"

# Row labels: arrow = which direction is better; m.P / m.L = the paper's masked PSNR / LPIPS.
LABELS = {
    "psnr": "PSNR dB ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓",
    "psnr_unedited": "m.P: PSNR unedited ↑", "ssim_unedited": "SSIM unedited ↑",
    "lpips_unedited": "m.L: LPIPS unedited ↓",
    "warp_error": "warp error ↓", "warp_error_edited": "warp err. edited ↓",
    "warp_error_source": "warp err. source", "smoothness": "smoothness ↑",
    "smoothness_source": "smoothness source", "vbench_smoothness": "VBench smooth. ↑",
    "clip_score": "CLIP score ↑", "pickscore": "PickScore ↑",
    "invert_s": "invert s ↓", "recon_psnr": "recon PSNR dB ↑", "vae_psnr": "VAE ceiling dB",
    "below_vae_db": "below VAE dB ↓", "seam": "seam of export ↓",
}


@app.command("eval")
def eval_command(
    workspaces: Annotated[list[Path], typer.Argument(
        metavar="WS", show_default=False,
        help="Workspace to evaluate; with --compare, several workspaces or folders of workspaces.")],
    edit: Annotated[Optional[list[str]], typer.Option(
        "--edit", "-e", metavar="NAME", rich_help_panel=_SEL,
        help="Evaluate only this edit (repeatable); 'reconstruction' selects the inversion.")] = None,
    all_edits: Annotated[bool, typer.Option(
        "--all", rich_help_panel=_SEL,
        help="Reconstruction plus every finished edit (the default without --edit).")] = False,
    metrics: Annotated[Optional[list[str]], typer.Option(
        "--metrics", "-m", metavar="LIST", rich_help_panel=_SEL,
        help="Comma list of psnr,ssim,lpips,warp,smoothness,vbench,clip,pickscore,seam or the groups "
             "fidelity,temporal,text,all (default all).")] = None,
    compare: Annotated[bool, typer.Option(
        "--compare", rich_help_panel=_CMP,
        help="One table over many clips: mean of each metric per edit name and over all edits.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", rich_help_panel=_CMP,
        help="With --compare: recompute even where stored results are current.")] = False,
    plot: Annotated[bool, typer.Option(
        "--plot", rich_help_panel=_SEL, help="Write per-frame PNG charts into eval/plots/.")] = False,
    lpips: Annotated[Optional[str], typer.Option(
        "--lpips", metavar="PATH", rich_help_panel=_WTS,
        help="LPIPS weights (file or folder; default $VD_LPIPS).")] = None,
    clip: Annotated[Optional[str], typer.Option(
        "--clip", metavar="DIR", rich_help_panel=_WTS,
        help="Local Hugging Face CLIP folder (default $VD_CLIP).")] = None,
    pickscore: Annotated[Optional[str], typer.Option(
        "--pickscore", metavar="DIR", rich_help_panel=_WTS,
        help="Local PickScore_v1 folder (default $VD_PICKSCORE).")] = None,
    amt: Annotated[Optional[str], typer.Option(
        "--amt", metavar="PATH", rich_help_panel=_WTS,
        help="VBench AMT-S checkpoint, for VBench motion smoothness (default $VD_AMT).")] = None,
    device: Annotated[str, typer.Option(
        "--device", rich_help_panel=_WTS, help="Device for the model-based metrics: auto, cpu, cuda[:N].")] = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score edits (fidelity outside the edit, temporal consistency, text alignment) and the inversion.

    Results are stored under eval/<name> in the workspace and printed as a table (or --json).
    """

    def work(progress: Any) -> dict[str, Any]:
        from stages.common.errors import UsageError
        from stages.evaluate import EvalConfig, compare as compare_all, parse_metrics, run_eval

        if all_edits and edit:
            raise UsageError("--all and --edit contradict each other; use one")
        if len(workspaces) > 1 and not compare:
            raise UsageError("several workspaces given; add --compare to evaluate them together")
        if force and not compare:
            raise UsageError("--force only applies with --compare (plain `vd eval` always recomputes)")
        if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise UsageError(f"--device {device!r}: use auto, cpu or cuda[:N]")
        config = EvalConfig(edits=list(edit or []), metrics=parse_metrics(metrics), lpips=lpips, clip=clip,
                            pickscore=pickscore, amt=amt, device=device, plot=plot)
        if compare:
            return compare_all(workspaces, config, progress, force=force)
        from stages.io import locks as stagelock
        from stages.io.workspace import Workspace

        ws = Workspace.open(workspaces[0])
        with stagelock.scope():  # frames and masks must not change (vd mask) while they are scored
            stagelock.hold(ws.path, stagelock.WORKSPACE, "vd eval", f"workspace {ws.path}", shared=True)
            return run_eval(ws, config, progress)

    run(work, json_out, quiet, print_compare if compare else _print_eval)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return "n/a"
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def _unavailable_notes(values: list[tuple[str, Any]]) -> list[str]:
    """One line per distinct reason: which metrics are n/a, why, and how to enable them."""
    notes: dict[tuple[str, str], list[str]] = {}
    for key, value in values:
        if isinstance(value, dict):
            keys = notes.setdefault((str(value.get("reason")), str(value.get("how"))), [])
            if key not in keys:
                keys.append(key)
    return [f"n/a {', '.join(keys)}: {reason}; {how}" for (reason, how), keys in notes.items()]


def _recon_table(rec: dict[str, Any], title: str, seen: list[tuple[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "whole frame", "inside mask", "outside mask"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for base in ("psnr", "ssim", "lpips"):
        if base in rec:
            vals = [rec.get(f"{base}{s}") for s in ("", "_inside", "_outside")]
            table.add_row(LABELS[base], *map(_fmt, vals))
            seen += [(base, v) for v in vals]
    return table


def _edits_table(columns: dict[str, dict[str, Any]], title: str, seen: list[tuple[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for header in columns:
        table.add_column(header, justify="right")
    keys = list(dict.fromkeys(k for m in columns.values() for k in m))
    for key in keys:
        vals = [m.get(key) for m in columns.values()]
        table.add_row(LABELS.get(key, key), *map(_fmt, vals))
        seen += [(key, v) for v in vals]
    return table


def _print_eval(result: dict[str, Any]) -> None:
    from rich.console import Console

    from stages.evaluate import RECON

    console = Console()
    items = result["items"]
    seen: list[tuple[str, Any]] = []
    if RECON in items:
        console.print(_recon_table(items[RECON]["metrics"], "Reconstruction vs source", seen))
    edits = {n: item["metrics"] for n, item in items.items() if n != RECON}
    if edits:
        console.print(_edits_table(edits, "Edits vs source", seen))
    for note in _unavailable_notes(seen):
        console.print(f"[dim]{note}[/dim]", highlight=False)
    for name, why in result.get("skipped", {}).items():
        console.print(f"skipped edit {name}: {why}", highlight=False)
    console.print(f"stored under eval/ in {result['workspace']}", highlight=False)
    for path in result.get("plots", []):
        console.print(f"plot: {Path(result['workspace']) / path}", highlight=False)


def print_compare(result: dict[str, Any]) -> None:
    from rich.console import Console

    from stages.evaluate import RECON

    console = Console()
    groups = result["groups"]
    seen: list[tuple[str, Any]] = []
    clips = len(result["clips"])
    if RECON in groups:
        console.print(_recon_table(groups[RECON]["metrics"], f"Reconstruction, mean over {clips} clip(s)", seen))
    edits = {f"{n} n={g['n']}": g["metrics"] for n, g in groups.items() if n != RECON}
    if edits:
        console.print(_edits_table(edits, f"Edits, mean over {clips} clip(s)", seen))
    if len(result.get("methods") or {}) > 1:  # clips inverted with different `vd invert --method`s
        from stages.evaluate.methods import method_columns

        columns = method_columns(result["methods"])
        console.print(_edits_table(columns, "By inversion method (vd invert --method), mean over its clips", seen))
    for note in _unavailable_notes(seen):
        console.print(f"[dim]{note}[/dim]", highlight=False)
    for path, why in result.get("skipped_clips", {}).items():
        console.print(f"skipped {path}: {why}", highlight=False)
