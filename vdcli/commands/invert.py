"""`vd invert`: DDIM inversion + multi-frame null-text optimisation with STDG (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vdcli.common import JsonOpt, PlanForOpt, PlanFramesOpt, PlanSizeOpt, QuietOpt, app, run

_IN, _MODEL, _METHOD, _RUN = "Input", "Model", "Method", "Runtime"


@app.command("invert")
def invert_command(
    workspace: Annotated[Optional[Path], typer.Argument(
        metavar="WS", show_default=False,
        help="Workspace made by `vd mask` (frames + masks); not needed by --dry-run --frames N --size WxH.")] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", metavar="TEXT", rich_help_panel=_IN,
        help="Description of the SOURCE video, e.g. \"A brown bear, walking on rocky terrain\". "
             "Optional when resuming: the stored prompt is used.")] = None,
    subject: Annotated[Optional[str], typer.Option(
        "--subject", metavar="TEXT", rich_help_panel=_IN,
        help="The words of the prompt naming the edited subject (\"brown bear\"); `vd edit --prompt tiger` "
             "replaces them. Changing it on a stored inversion keeps the inversion.")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(
        "--negative-prompt", metavar="TEXT", rich_help_panel=_IN,
        help="Initialises the null text (and the plain-DDIM comparison). \\[default: \"\"]")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", metavar="NAME|FILE", rich_help_panel=_METHOD,
        help="Preset name (default, foreground, background, fast, bear, ...) or YAML file; its `invert:` "
             "section, overridden by flags.")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", metavar="SPEC", rich_help_panel=_MODEL,
        help="sd15-animatediff-v3, tiny, sd15-random, an SD1.5 folder or .safetensors. "
             "\\[default: sd15-animatediff-v3]")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", rich_help_panel=_METHOD, help="DDIM steps S. \\[default: 50]")] = None,
    cfg_scale: Annotated[Optional[float], typer.Option(
        "--cfg", rich_help_panel=_METHOD,
        help="Guidance w in the reference form eps_c + w (eps_c - eps_u); w = 7.5 equals diffusers' "
             "guidance_scale 8.5. \\[default: 7.5]")] = None,
    null_steps: Annotated[Optional[int], typer.Option(
        "--null-steps", rich_help_panel=_METHOD,
        help="Max Adam iterations per step for the null text (early stop 1e-5 + i*2e-5). \\[default: 10]")] = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", metavar="null-text|direct|negative-prompt", rich_help_panel=_METHOD,
        help="null-text: per-step null-text optimisation (the paper); direct: stored per-step offsets, no "
             "optimisation, exact reconstruction; negative-prompt: the source prompt as null text. "
             "\\[default: null-text]")] = None,
    stdg: Annotated[Optional[str], typer.Option(
        "--stdg", metavar="ETA_F,ETA_B,ZETA_F,ZETA_B", rich_help_panel=_METHOD,
        help="STDG coefficients: temporal fg/bg, appearance fg/bg. \\[default: 0.5,0.5,0,0.5; "
             "background region 0.5,0.5,0.5,0]")] = None,
    region: Annotated[Optional[str], typer.Option(
        "--region", rich_help_panel=_METHOD,
        help="foreground (edit the subject) or background editing; picks the default --stdg and is "
             "checked by `vd edit --background`. \\[default: foreground]")] = None,
    no_stdg: Annotated[bool, typer.Option("--no-stdg", rich_help_panel=_METHOD,
                                          help="No STDG (plain multi-frame null-text inversion).")] = False,
    shared_null: Annotated[Optional[bool], typer.Option(
        "--shared-null/--no-shared-null", rich_help_panel=_METHOD, show_default=False,
        help="One null text for all frames (car_turn) instead of one per frame. \\[default: off]")] = None,
    schedule: Annotated[Optional[str], typer.Option(
        "--schedule", rich_help_panel=_METHOD,
        help="vd (one consistent grid) or reference (the reference code's grids and t-20 rule, for "
             "number-for-number comparison). \\[default: vd]")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", rich_help_panel=_METHOD,
                                                help="Seed of the VAE posterior sample. \\[default: 42]")] = None,
    per_frame_groupnorm: Annotated[Optional[bool], typer.Option(
        "--per-frame-groupnorm/--no-per-frame-groupnorm", rich_help_panel=_MODEL, show_default=False,
        help="Motion-module GroupNorm per frame like the original AnimateDiff (default) or across frames "
             "like diffusers.")] = None,
    store_components: Annotated[Optional[bool], typer.Option(
        "--store-components/--no-store-components", rich_help_panel=_METHOD, show_default=False,
        help="Also store the four STDG gradient terms per step (4 extra backward passes per step). "
             "\\[default: off]")] = None,
    plain: Annotated[Optional[bool], typer.Option(
        "--plain/--no-plain", rich_help_panel=_METHOD, show_default=False,
        help="Run the method step by step as the reference does (4x GT/grad passes; benchmark baseline). "
             "\\[default: off]")] = None,
    compare_ddim: Annotated[bool, typer.Option(
        "--compare-ddim", rich_help_panel=_RUN,
        help="Also report plain DDIM (CFG, negative prompt) reconstruction PSNR (S extra batch-2 forwards).")] = False,
    window: Annotated[Optional[int], typer.Option(
        "--window", rich_help_panel=_METHOD,
        help="Frames per UNet call (at most 32); longer clips run in overlapping windows. \\[default: 16]")] = None,
    overlap: Annotated[Optional[int], typer.Option(
        "--overlap", rich_help_panel=_METHOD,
        help="Frames shared by neighbouring windows (less than --window). \\[default: 4]")] = None,
    restart: Annotated[bool, typer.Option(
        "--restart", rich_help_panel=_RUN,
        help="Discard a stored (finished or partial) inversion and start over, with its stored settings unless "
             "flags override them. Edits made from the old inversion become stale (`vd info` lists them).")] = False,
    device: Annotated[str, typer.Option("--device", rich_help_panel=_RUN, help="auto, cpu or cuda[:N].")] = "auto",
    checkpointing: Annotated[Optional[str], typer.Option(
        "--checkpointing", metavar="off|blocks|layers|auto", rich_help_panel=_RUN,
        help="Recompute each UNet block (blocks) or each layer inside the blocks (layers: least memory) in the "
             "backward instead of keeping its activations (same results, less memory, more time); auto: the "
             "first of off, blocks, layers whose predicted peak fits the GPU's free memory, off on the CPU. "
             "\\[default: auto]")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", rich_help_panel=_RUN,
        help="Print the predicted peak memory per pass and an estimate of the time per step; loads no "
             "weights, writes nothing.")] = False,
    plan_for: PlanForOpt = None,
    plan_frames: PlanFramesOpt = None,
    plan_size: PlanSizeOpt = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", rich_help_panel=_RUN,
        help="auto (bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16. \\[default: auto]")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Invert the clip for editing: DDIM inversion, then per-step null-text optimisation with STDG.

    Every finished step is saved; Ctrl-C (exit 130) keeps them and rerunning the same command resumes.
    Writes inversion/ in the workspace (trajectory, null embeddings, STDG guidance, reconstruction.mp4,
    preview.gif) and prints the reconstruction quality.
    """

    def work(progress: Any) -> dict[str, Any]:
        from stages.common.errors import UsageError
        from stages.invert import resolve_config, run_invert
        from stages.common.config import options, preset_section
        from stages.io.workspace import Workspace

        coefficients = None
        if stdg is not None:
            from stages.method.guidance import parse_coefficients  # torch: imported only when needed

            try:
                coefficients = list(parse_coefficients(stdg))
            except ValueError as exc:
                raise UsageError(f"--stdg: {exc}") from None
        if no_stdg and coefficients is not None:
            raise UsageError("--stdg and --no-stdg contradict each other")
        if prompt is not None and not prompt.strip():
            raise UsageError("--prompt must not be empty: describe the source video")
        from stages.invert.plan import config_without_workspace, plan_inputs

        target, plan_n, plan_hw = plan_inputs(workspace is not None, dry_run, plan_for, plan_frames, plan_size)
        ws = Workspace.open(workspace) if workspace is not None else None
        flags: dict[str, Any] = {
            "prompt": prompt, "subject": subject, "negative_prompt": negative_prompt, "model": model,
            "steps": steps, "cfg": cfg_scale, "null_steps": null_steps, "stdg": coefficients, "region": region,
            "method": method,
            "use_stdg": False if no_stdg else (True if coefficients is not None else None),
            "shared_null": shared_null, "schedule": schedule, "seed": seed,
            "per_frame_groupnorm": per_frame_groupnorm, "store_components": store_components,
            "plain": plain, "compare_ddim": compare_ddim or None, "device": device, "dtype": dtype,
            "restart": restart or None, "preset": preset, "window": window, "overlap": overlap,
            "checkpointing": checkpointing,
        }
        section = preset_section(preset, "invert")
        cfg = resolve_config(ws, section, options(flags)) if ws is not None else \
            config_without_workspace(section, options(flags))
        if region is not None and coefficients is None and "stdg" not in section:
            cfg.stdg = None  # --region alone picks that region's default coefficients
        if dry_run:
            from stages.invert.plan import plan_invert

            return plan_invert(ws, cfg, target, plan_n, plan_hw)
        return run_invert(ws, cfg, progress)

    run(work, json_out, quiet, _print_plan if dry_run else _print_human)


def _print_plan(result: dict[str, Any]) -> None:
    from stages.invert.plan import format_plan

    print(format_plan(result), flush=True)


def _print_human(result: dict[str, Any]) -> None:
    recon = result.get("recon") or {}

    def db(key: str) -> str:
        value = recon.get(key)
        return f"{float(value):.2f} dB" if isinstance(value, (int, float)) else str(value)

    inner = result.get("inner_iterations") or []
    mean_inner = sum(inner) / len(inner) if inner else 0.0
    method = result.get("method") or "null-text"
    how = f"mean null-text iterations {mean_inner:.1f}" if method == "null-text" else f"method {method}"
    lines = [f"inverted {result.get('workspace', '')}: {result.get('steps', '?')} steps, "
             f"{result.get('frames', '?')} frames, {how}"]
    if recon:
        line = f"reconstruction PSNR {db('psnr')}"
        if "psnr_fg" in recon:
            line += f" (inside mask {db('psnr_fg')}, outside {db('psnr_bg')})"
        line += f", latent MSE {float(recon.get('latent_mse', float('nan'))):.3g}, VAE-only PSNR {db('vae_psnr')}"
        lines.append(line)
        if "ddim_psnr" in recon:
            lines.append(f"plain DDIM reconstruction PSNR {db('ddim_psnr')}, latent MSE "
                         f"{float(recon['ddim_latent_mse']):.3g}")
    total = (result.get("timings") or {}).get("total_s")
    if total is not None and not result.get("already_done"):
        lines.append(f"time {float(total):.1f} s")
    lines.append(str((result.get("outputs") or {}).get("preview.gif", "")))
    print("\n".join(x for x in lines if x), flush=True)
