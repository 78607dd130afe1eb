"""`vd mask CLIP`: decode, sample and resize the clip, segment the object, write the workspace."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from vdcli.common import JsonOpt, QuietOpt, app, run

_IN, _FR, _MK, _OUT = "Input", "Frames", "Mask", "Output"


@app.command("mask")
def mask(
    clip: Annotated[str, typer.Argument(help="Video file (mp4, mov, webm, mkv, gif, ...) or a folder of images.",
                                        show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Workspace directory (default: ./STEM.vd, STEM = the clip's name without extension).",
                                                  rich_help_panel=_OUT)] = None,
    frames: Annotated[str, typer.Option(help="Number of frames to keep, or 'all' (longer than --window "
                                        "frames: vd invert runs overlapping windows).", rich_help_panel=_FR)] = "16",
    size: Annotated[str, typer.Option(help="Output size N or WIDTHxHEIGHT, multiples of 64.",
                                      rich_help_panel=_FR)] = "512",
    start: Annotated[int, typer.Option(help="First source frame.", rich_help_panel=_FR)] = 0,
    stride: Annotated[Optional[int], typer.Option(help="Take every K-th source frame (default 1).",
                                                  rich_help_panel=_FR)] = None,
    fps: Annotated[Optional[float], typer.Option(help="Sample at this frame rate instead of --stride.",
                                                 rich_help_panel=_FR)] = None,
    sample: Annotated[str, typer.Option(help="'stride', or 'uniform': stride floor(N/frames) over the whole clip "
                                             "(the reference's sampling).", rich_help_panel=_FR)] = "stride",
    resize: Annotated[str, typer.Option(help="crop (keep aspect, centre crop), pad (keep aspect, black bars) "
                                             "or stretch.", rich_help_panel=_FR)] = "crop",
    point: Annotated[Optional[list[str]], typer.Option(help="SAM2 click X,Y[,LABEL] in output pixels "
                                                            "(LABEL 1 object, 0 background); repeatable.",
                                                       rich_help_panel=_MK)] = None,
    box: Annotated[Optional[str], typer.Option(help="SAM2 box X0,Y0,X1,Y1 in output pixels.",
                                               rich_help_panel=_MK)] = None,
    prompt_frame: Annotated[int, typer.Option(help="Frame (0-based, among the kept frames) the prompts refer to.",
                                              rich_help_panel=_MK)] = 0,
    sam2: Annotated[str, typer.Option(help="SAM2 checkpoint: tiny, small, base_plus, large, a .pt path, auto "
                                           "(largest found locally) or random (untrained; tests only).", rich_help_panel=_MK)] = "auto",
    mask_dir: Annotated[Optional[str], typer.Option(help="Import masks: PNG folder, one per kept frame or one per "
                                                         "source frame; non-zero = object.", rich_help_panel=_MK)] = None,
    mask_video: Annotated[Optional[str], typer.Option(help="Import masks from a video decoded like the clip.",
                                                      rich_help_panel=_MK)] = None,
    box_only: Annotated[bool, typer.Option("--box-only", help="Use the --box rectangle itself on every frame "
                                                              "(no SAM2).", rich_help_panel=_MK)] = False,
    no_ellipse: Annotated[bool, typer.Option("--no-ellipse", help="masks/edit = raw mask (skip the ellipse union).",
                                             rich_help_panel=_MK)] = False,
    device: Annotated[str, typer.Option(help="SAM2 device: auto, cpu or cuda.", rich_help_panel=_MK)] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace a workspace made from another clip or frame "
                                                        "selection.", rich_help_panel=_OUT)] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Create a workspace from CLIP and print its path.

    Example: vd mask bear.mp4 --box 120,80,400,460   then   vd invert bear.vd --prompt "a brown bear walking"
    """

    def work(progress):  # type: ignore[no-untyped-def]
        from stages.common.config import build_config, options
        from stages.mask.run import MaskConfig, parse_frames, run_mask

        config = build_config(MaskConfig, options(dict(
            frames=parse_frames(frames), size=size, start=start, stride=stride, fps=fps, sample=sample, resize=resize,
            points=list(point or []), box=box, prompt_frame=prompt_frame, sam2=sam2, device=device,
            mask_dir=mask_dir, mask_video=mask_video, box_only=box_only, ellipse=not no_ellipse, force=force)))
        return run_mask(clip, output, config, progress)

    def human(result: dict) -> None:  # type: ignore[type-arg]
        print(result["workspace"], flush=True)

    run(work, json_out, quiet, human)
