"""`vd demo`: the whole pipeline on a generated clip (tiny model offline, real weights when present)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vdcli.common import JsonOpt, QuietOpt, app, run


@app.command("demo")
def demo(
    folder: Annotated[Path, typer.Argument(help="Folder for the clip and its workspace.")] = Path("demo"),
    model: Annotated[str, typer.Option(help="auto (real weights if present, else tiny), tiny, or a model spec.")] = "auto",
    frames: Annotated[Optional[int], typer.Option(help="Frames (default 8 tiny / 16 real).")] = None,
    size: Annotated[Optional[int], typer.Option(help="Frame size in pixels (default 128 tiny / 512 real).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps (default 10 tiny / 50 real).")] = None,
    null_steps: Annotated[Optional[int], typer.Option(help="Null-text iterations per step.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate a clip and run mask -> invert -> edit -> eval on it; print where everything is."""

    def work(progress: Any) -> dict[str, Any]:
        from stages.demo import DemoConfig, run_demo

        return run_demo(folder, DemoConfig(model=model, frames=frames, size=size, steps=steps,
                                           null_steps=null_steps, device=device), progress)

    def human(r: dict[str, Any]) -> None:
        from rich.console import Console

        out = Console()
        out.print(f"[bold]workspace[/]      {r['workspace']}")
        out.print(f"clip           {r['clip']}")
        out.print(f"mask preview   {r['mask_preview']}")
        for key, path in (r.get("reconstruction") or {}).items():
            out.print(f"inversion      {path}")
        edit = r.get("edit") or {}
        for key, path in (edit.items() if isinstance(edit, dict) else []):
            out.print(f"edit {key:<9} {path}")
        out.print("timings        " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))
        if r["tiny"]:
            out.print("[yellow]tiny random model: the output is noise that proves the plumbing; "
                      "real edits need the real weights (vd models)[/]", soft_wrap=True)
        out.print("the same from a shell:")
        for c in r["commands"]:
            out.print(f"  {c}", markup=False, highlight=False, soft_wrap=True)

    run(work, json_out, quiet, human)
