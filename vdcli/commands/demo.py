"""`vd demo`: the whole pipeline on a generated clip (tiny model offline, real weights when present)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vdcli.common import JsonOpt, QuietOpt, app, run

_CLIP, _RUN = "Clip", "Model and run"


def _scores(r: dict[str, Any]) -> list[str]:
    """One line each: the reconstruction PSNR and the edit's headline metrics (numbers only)."""
    lines = []
    recon = r.get("recon") or {}
    if isinstance(recon.get("psnr"), (int, float)):
        vae = recon.get("vae_psnr")
        lines.append(f"reconstruction PSNR {recon['psnr']:.2f} dB"
                     + (f" (VAE-only ceiling {vae:.2f} dB)" if isinstance(vae, (int, float)) else ""))
    for name, item in (r.get("eval") or {}).items():
        metrics = item.get("metrics") or {}
        shown = [f"{key} {metrics[key]:.4g}" for key in ("psnr_unedited", "warp_error", "smoothness")
                 if isinstance(metrics.get(key), (int, float))]
        if name != "reconstruction" and shown:
            lines.append(f"edit {name}: " + ", ".join(shown) + " (vd eval for all)")
    return lines


@app.command("demo")
def demo(
    folder: Annotated[Path, typer.Argument(help="Folder for the clip and its workspace.")] = Path("demo"),
    frames: Annotated[Optional[int], typer.Option(
        help="Frames (default 8 tiny / 16 real).", rich_help_panel=_CLIP)] = None,
    size: Annotated[Optional[int], typer.Option(
        help="Frame size in pixels (default 128 tiny / 512 real).", rich_help_panel=_CLIP)] = None,
    model: Annotated[str, typer.Option(
        help="auto (real weights if present, else tiny), tiny, or a model spec.", rich_help_panel=_RUN)] = "auto",
    steps: Annotated[Optional[int], typer.Option(
        help="DDIM steps (default 10 tiny / 50 real).", rich_help_panel=_RUN)] = None,
    null_steps: Annotated[Optional[int], typer.Option(
        help="Null-text iterations per step (default 3 tiny / 10 real).", rich_help_panel=_RUN)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=_RUN)] = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate a clip and run mask -> invert -> edit -> eval on it; print where everything is."""

    def work(progress: Any) -> dict[str, Any]:
        from stages.demo import DemoConfig, run_demo
        from stages.common.errors import UsageError

        limits = {"frames": (frames, 1, 256), "size": (size, 64, 2048), "steps": (steps, 2, 1000),
                  "null-steps": (null_steps, 1, 10000)}
        for flag, (value, low, high) in limits.items():
            if value is not None and not low <= value <= high:
                raise UsageError(f"--{flag} must be in {low}..{high}, got {value}")
        return run_demo(folder, DemoConfig(model=model, frames=frames, size=size, steps=steps,
                                           null_steps=null_steps, device=device), progress)

    def human(r: dict[str, Any]) -> None:
        from rich.console import Console

        out = Console()

        def line(label: str, text: Any) -> None:
            out.print(f"{label:<24} {text}", markup=False, highlight=False, soft_wrap=True)

        line("workspace", r["workspace"])
        line("clip", r["clip"])
        line("mask preview", r["mask_preview"])
        for key, path in (r.get("reconstruction") or {}).items():
            line(f"inversion {Path(key).stem}", path)
        edit = r.get("edit") or {}
        for key, path in (edit.items() if isinstance(edit, dict) else []):
            line(f"edit {key}", path)
        for text in _scores(r):
            line("scores", text)
        line("timings", ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in r["timings"].items()))
        if r["tiny"]:
            out.print("[yellow]tiny random model: the output is noise that proves the plumbing; "
                      "real edits need the real weights (vd models)[/]", soft_wrap=True)
        out.print("the same from a shell:")
        for c in r["commands"]:
            out.print(f"  {c}", markup=False, highlight=False, soft_wrap=True)

    run(work, json_out, quiet, human)
