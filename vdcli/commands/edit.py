"""`vd edit`: edit an inverted clip with a new prompt (or a phrase that replaces the subject), or edit named
objects one phrase each (`--region NAME=PHRASE`, docs/concepts/extensions.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vdcli.common import JsonOpt, PlanForOpt, PlanFramesOpt, PlanSizeOpt, QuietOpt, app, run

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


def edit_settings(line: str) -> dict[str, Any]:
    """The per-edit settings of a prompt or prompt-file line: {"prompt": ...} or, for a line
    `regions: NAME=PHRASE ...`, {"regions": {...}}."""
    from stages.edit.regions import parse_regions_line

    regions = parse_regions_line(line)
    return {"prompt": line} if regions is None else {"regions": regions}


@app.command("edit")
def edit_command(
    workspace: Annotated[Optional[Path], typer.Argument(
        metavar="WS", show_default=False,
        help="Workspace with a finished inversion (vd invert); not needed by --dry-run --frames N --size WxH.")] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", metavar="TEXT", rich_help_panel=_IN,
        help="Full target prompt, or a short phrase that replaces the workspace's subject "
             "(\"tiger\" turns \"A brown bear, walking ...\" into \"A tiger, walking ...\").")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", metavar="FILE", rich_help_panel=_IN,
        help="One edit per line (blank lines and # comments skipped; `regions: NAME=PHRASE ...` lines are "
             "region edits); the model loads once.")] = None,
    region: Annotated[Optional[list[str]], typer.Option(
        "--region", metavar="NAME=PHRASE", rich_help_panel=_IN,
        help="Edit the named object (vd mask --object) into PHRASE (repeatable): its source phrase in the "
             "prompt is replaced, e.g. dog=\"a white cat\".")] = None,
    objects: Annotated[Optional[list[str]], typer.Option(
        "--object", metavar="NAME=PHRASE", rich_help_panel=_IN,
        help="Source phrase of an object (words of the inversion prompt), when vd mask stored none.")] = None,
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
    layout_steps: Annotated[Optional[float], typer.Option(
        "--layout-steps", rich_help_panel=_METHOD,
        help="Regions: fraction of the first steps with VideoGrain's layout modulation (0 = off). "
             "(default 0.3)")] = None,
    layout_strength: Annotated[Optional[float], typer.Option(
        "--layout-strength", rich_help_panel=_METHOD,
        help="Regions: multiplier of the layout modulation's lambdas (1.0 cross-, 0.3 self-attention; "
             "0 = off, at most 100). (default 1.0)")] = None,
    no_region_blend: Annotated[bool, typer.Option(
        "--no-region-blend", rich_help_panel=_METHOD,
        help="Regions: no local blend per object (unedited objects are then not pinned to the source).")] = False,
    first_frame: Annotated[Optional[Path], typer.Option(
        "--first-frame", metavar="IMAGE", rich_help_panel=_IN,
        help="Edited first frame (RGB image at the workspace's frame size, or resized with its crop/pad rule): "
             "conditions the edit through SparseCtrl RGB (vd models --get sparsectrl-rgb). Without --prompt the "
             "target prompt is the source prompt.")] = None,
    first_frame_scale: Annotated[Optional[float], typer.Option(
        "--first-frame-scale", metavar="S", rich_help_panel=_METHOD,
        help="SparseCtrl conditioning scale (>= 0; 0 = no effect). (default 1.0)")] = None,
    first_frame_steps: Annotated[Optional[int], typer.Option(
        "--first-frame-steps", metavar="K", rich_help_panel=_METHOD,
        help="Condition the first K sampling steps only. (default: every step)")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", rich_help_panel=_METHOD, help="Preset name or YAML file (its `edit:` section).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="OUT.mp4", rich_help_panel=_OUT, help="Also write the edited mp4 here.")] = None,
    force: Annotated[bool, typer.Option("--force", rich_help_panel=_OUT,
                                        help="Replace an existing edit of the same name.")] = False,
    device: Annotated[str, typer.Option("--device", rich_help_panel=_RUN, help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", rich_help_panel=_RUN, help="auto, fp32, fp16 or bf16.")] = "auto",
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", rich_help_panel=_RUN,
        help="Print the predicted peak memory and an estimate of the time per step; loads no weights, writes "
             "nothing.")] = False,
    plan_for: PlanForOpt = None,
    plan_frames: PlanFramesOpt = None,
    plan_size: PlanSizeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Edit the clip: Prompt-to-Prompt cross-attention, SA-I/SA-II self-attention control and STDG.

    Writes edits/<name>/{frames, edit.mp4, preview.gif} in the workspace and prints the mp4 path; with
    --first-frame also the image (first_frame.<ext>, first_frame) and SparseCtrl RGB conditions the edit.
    """

    def work(progress: Any) -> dict[str, Any]:
        from stages.common.config import build_config, options, preset_section
        from stages.common.errors import UsageError
        from stages.io.workspace import Workspace
        from stages.invert.plan import plan_inputs

        target, plan_n, plan_hw = plan_inputs(workspace is not None, dry_run, plan_for, plan_frames, plan_size)
        if dry_run:
            from stages.edit.plan import plan_edit_run

            return plan_edit_run(Workspace.open(workspace) if workspace is not None else None, device, dtype,
                                 target, plan_n, plan_hw, first_frame is not None, bool(region))
        given = (prompt is not None) + (prompt_file is not None) + bool(region)
        if given > 1 or (given == 0 and first_frame is None):
            raise UsageError("give exactly one of --prompt TEXT, --prompt-file FILE or --region NAME=PHRASE")
        if first_frame is None and (first_frame_scale is not None or first_frame_steps is not None):
            raise UsageError("--first-frame-scale and --first-frame-steps need --first-frame IMAGE")
        if prompt_file is not None and (name or output):
            raise UsageError("--name and -o apply to a single edit; they cannot be combined with --prompt-file")
        from stages.edit.regions import parse_assignments  # torch (via prompts): after the cheap checks

        regions = parse_assignments(region, "--region")
        ws = Workspace.open(workspace)
        if regions:
            edits = [{"regions": regions}]
        elif prompt is not None:
            edits = [{"prompt": prompt}]
        elif prompt_file is not None:
            edits = [edit_settings(line) for line in read_prompt_file(prompt_file)]
        else:  # --first-frame alone: the target prompt is the source prompt
            edits = [{}]
        sources = parse_assignments(objects, "--object")
        if sources and not any("regions" in edit for edit in edits):
            raise UsageError("--object gives the source phrases of region edits; add --region NAME=PHRASE")
        for edit in edits:  # the source phrases belong to the region edits only
            if sources and "regions" in edit:
                edit["objects"] = sources
        flags: dict[str, Any] = {
            "name": name, "reweight": parse_reweight(reweight) or None, "tau_s": tau_s, "tau_c": tau_c,
            "background": True if background else None, "cross_mode": cross_mode,
            "blend": blend.replace(",", " ").split() if blend else None,
            "sa1": False if no_sa1 else None, "sa2": False if no_sa2 else None,
            "cross": False if no_cross else None, "stdg": False if no_stdg else None,
            "output": str(output) if output else None, "force": force or None, "device": device, "dtype": dtype,
            "layout_steps": layout_steps,
            "layout_strength": layout_strength, "region_blend": False if no_region_blend else None,
            "first_frame": str(first_frame.expanduser().absolute()) if first_frame is not None else None,
            "first_frame_scale": first_frame_scale, "first_frame_steps": first_frame_steps,
        }
        section = preset_section(preset, "edit")
        from stages.edit.run import EditConfig, run_edits  # torch: after the cheap checks

        cfgs = [build_config(EditConfig, section, options(flags), options(edit)) for edit in edits]
        results = run_edits(ws, cfgs, progress)
        if len(results) == 1:
            return results[0]
        return {"edits": results}

    run(work, json_out, quiet, _print_plan if dry_run else _print_human)


def _print_plan(result: dict[str, Any]) -> None:
    from stages.invert.plan import format_plan

    print(format_plan(result), flush=True)


def _print_human(result: dict[str, Any]) -> None:
    for item in result.get("edits", [result]):
        print(item["outputs"].get("output") or item["outputs"]["mp4"], flush=True)
