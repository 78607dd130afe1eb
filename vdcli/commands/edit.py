"""`vd edit`: edit an inverted clip with a new prompt (or a phrase that replaces the subject)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vdcli.common import JsonOpt, QuietOpt, app, run

_IN, _METHOD, _OUT, _RUN = "Input", "Method", "Output", "Runtime"


def parse_reweight(items: list[str] | None) -> dict[str, float]:
    """["tiger=2", "white=0.5"] -> {"tiger": 2.0, "white": 0.5}; malformed -> UsageError."""
    from stages.common.errors import UsageError

    out: dict[str, float] = {}
    for item in items or []:
        word, sep, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or not word.strip() or weight is None:
            raise UsageError(f"--reweight {item!r}: expected WORD=NUMBER, e.g. tiger=2")
        if not math.isfinite(weight):
            raise UsageError(f"--reweight {item!r}: the weight must be a finite number")
        out[word.strip()] = weight
    return out


def read_prompt_file(path: Path) -> list[str]:
    """Prompts, one per line; blank lines and # comments skipped."""
    from stages.common.errors import InputError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts (blank lines and # comments are skipped)")
    return prompts


@app.command("edit")
def edit_command(
    workspace: Annotated[Path, typer.Argument(metavar="WS", show_default=False,
                                              help="Workspace with a finished inversion (vd invert).")],
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", metavar="TEXT", rich_help_panel=_IN,
        help="Full target prompt, or a short phrase that replaces the workspace's subject "
             "(\"tiger\" turns \"A brown bear, walking ...\" into \"A tiger, walking ...\").")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", metavar="FILE", rich_help_panel=_IN,
        help="One edit per line (blank lines and # comments skipped); the model loads once.")] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", "-n", rich_help_panel=_OUT, help="Edit name under edits/ (default: the changed words).")] = None,
    reweight: Annotated[Optional[list[str]], typer.Option(
        "--reweight", metavar="WORD=C", rich_help_panel=_METHOD,
        help="Scale the cross-attention of a target word by C (repeatable), e.g. tiger=2.")] = None,
    tau_s: Annotated[Optional[float], typer.Option(
        "--tau-s", rich_help_panel=_METHOD,
        help="Fraction of steps with SA-I (self-attention replacement); SA-II runs after. (default 0.4)")] = None,
    tau_c: Annotated[Optional[float], typer.Option(
        "--tau-c", rich_help_panel=_METHOD,
        help="Fraction of steps with Prompt-to-Prompt cross-attention control. (default 0.8)")] = None,
    background: Annotated[bool, typer.Option(
        "--background", rich_help_panel=_METHOD,
        help="Edit the background (needs an inversion made with --preset background).")] = False,
    blend: Annotated[Optional[str], typer.Option(
        "--blend", metavar="WORDS", rich_help_panel=_METHOD,
        help="Local blend: keep everything outside the cross-attention mask of these words "
             "(e.g. \"bear tiger\").")] = None,
    cross_mode: Annotated[Optional[str], typer.Option(
        "--cross-mode", rich_help_panel=_METHOD,
        help="auto (word swap when token counts match, else refine), refine or swap. (default auto)")] = None,
    no_sa1: Annotated[bool, typer.Option("--no-sa1", rich_help_panel=_METHOD, help="Disable SA-I.")] = False,
    no_sa2: Annotated[bool, typer.Option("--no-sa2", rich_help_panel=_METHOD,
                                         help="Disable SA-II (mutual attention).")] = False,
    no_cross: Annotated[bool, typer.Option("--no-cross", rich_help_panel=_METHOD,
                                           help="Disable Prompt-to-Prompt cross-attention control.")] = False,
    no_stdg: Annotated[bool, typer.Option("--no-stdg", rich_help_panel=_METHOD,
                                          help="Do not apply the stored STDG guidance.")] = False,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", rich_help_panel=_METHOD, help="Preset name or YAML file (its `edit:` section).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="OUT.mp4", rich_help_panel=_OUT, help="Also write the edited mp4 here.")] = None,
    force: Annotated[bool, typer.Option("--force", rich_help_panel=_OUT,
                                        help="Replace an existing edit of the same name.")] = False,
    device: Annotated[str, typer.Option("--device", rich_help_panel=_RUN, help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", rich_help_panel=_RUN, help="auto, fp32, fp16 or bf16.")] = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Edit the clip: Prompt-to-Prompt cross-attention, SA-I/SA-II self-attention control and STDG.

    Writes edits/<name>/{frames, edit.mp4, preview.gif} in the workspace and prints the mp4 path.
    """

    def work(progress: Any) -> dict[str, Any]:
        from stages.common.config import build_config, options, preset_section
        from stages.common.errors import UsageError
        from stages.io.workspace import Workspace

        if (prompt is None) == (prompt_file is None):
            raise UsageError("give exactly one of --prompt TEXT or --prompt-file FILE")
        if prompt_file is not None and (name or output):
            raise UsageError("--name and -o apply to a single edit; they cannot be combined with --prompt-file")
        ws = Workspace.open(workspace)
        prompts = [prompt] if prompt is not None else read_prompt_file(prompt_file)  # type: ignore[list-item]
        flags: dict[str, Any] = {
            "name": name, "reweight": parse_reweight(reweight) or None, "tau_s": tau_s, "tau_c": tau_c,
            "background": True if background else None, "cross_mode": cross_mode,
            "blend": blend.replace(",", " ").split() if blend else None,
            "sa1": False if no_sa1 else None, "sa2": False if no_sa2 else None,
            "cross": False if no_cross else None, "stdg": False if no_stdg else None,
            "output": str(output) if output else None, "force": force or None, "device": device, "dtype": dtype,
        }
        section = preset_section(preset, "edit")
        from stages.edit.run import EditConfig, run_edits  # torch: after the cheap checks

        cfgs = [build_config(EditConfig, section, options(flags), options({"prompt": p})) for p in prompts]
        results = run_edits(ws, cfgs, progress)
        if len(results) == 1:
            return results[0]
        return {"edits": results}

    run(work, json_out, quiet, _print_human)


def _print_human(result: dict[str, Any]) -> None:
    for item in result.get("edits", [result]):
        print(item["outputs"].get("output") or item["outputs"]["mp4"], flush=True)
