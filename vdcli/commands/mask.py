"""`vd mask CLIP`: decode, sample and resize the clip, segment the object, write the workspace."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from vdcli.common import JsonOpt, QuietOpt, app, run

_IN, _FR, _MK, _OBJ, _OUT = "Input", "Frames", "Mask", "Objects", "Output"
RAW_ARGS = "vd_mask_args"


class KeepsArgOrder(TyperCommand):
    """Keeps the raw argument list: which --point/--box/--text follow which --object is read from it
    (Click gathers each repeated option into its own list and loses the interleaving)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[RAW_ARGS] = list(args)
        return super().parse_args(ctx, args)


@app.command("mask", cls=KeepsArgOrder)
def mask(
    ctx: typer.Context,
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
                                                            "(LABEL 1 object, 0 background); repeatable; "
                                                            "belongs to the --object before it.",
                                                       rich_help_panel=_MK)] = None,
    box: Annotated[Optional[list[str]], typer.Option(help="SAM2 box X0,Y0,X1,Y1 in output pixels; one per "
                                                          "object.", rich_help_panel=_MK)] = None,
    text: Annotated[Optional[list[str]], typer.Option(
        help="Find the object by a phrase (\"brown bear\") on the prompt frame with Grounding DINO, then track "
             "it; one per object (`vd models --get grounding-dino`).", rich_help_panel=_MK)] = None,
    object_: Annotated[Optional[list[str]], typer.Option(
        "--object", metavar="NAME[=PHRASE]",
        help="Start a named object; the --point/--box/--text after it (until the next --object) are its prompts. "
             "PHRASE: its words in the video's prompt (\"bear=brown bear\"; default: its --text). Repeatable.",
        rich_help_panel=_OBJ)] = None,
    subject: Annotated[Optional[str], typer.Option(
        help="Without --object: the phrase of the one object (\"brown bear\"); it is stored as object "
             "brown_bear (default name: object).", rich_help_panel=_OBJ)] = None,
    detector: Annotated[str, typer.Option(help="Grounding DINO for --text: auto ($VD_GROUNDING_DINO or the "
                                               "Hugging Face cache), a folder, or random (untrained tiny one, "
                                               "named tiny-random; tests only).", rich_help_panel=_OBJ)] = "auto",
    text_threshold: Annotated[float, typer.Option(help="Least detector score a --text box needs (0..1].",
                                                  rich_help_panel=_OBJ)] = 0.3,
    prompt_frame: Annotated[int, typer.Option(help="Frame (0-based, among the kept frames) the prompts refer to.",
                                              rich_help_panel=_MK)] = 0,
    sam2: Annotated[str, typer.Option(help="SAM2 checkpoint: tiny, small, base_plus, large, a .pt path, auto "
                                           "(largest found locally) or random (untrained; tests only).", rich_help_panel=_MK)] = "auto",
    mask_dir: Annotated[Optional[str], typer.Option(help="Import masks: PNG folder, one per kept frame or one per "
                                                         "source frame; non-zero = object.", rich_help_panel=_MK)] = None,
    mask_video: Annotated[Optional[str], typer.Option(help="Import masks from a video decoded like the clip.",
                                                      rich_help_panel=_MK)] = None,
    box_only: Annotated[bool, typer.Option("--box-only", help="Use the --box rectangle itself on every frame "
                                                              "(no SAM2); with --object, each object's own --box "
                                                              "(every object needs one).",
                                           rich_help_panel=_MK)] = False,
    no_ellipse: Annotated[bool, typer.Option("--no-ellipse", help="masks/edit = raw mask (skip the ellipse union).",
                                             rich_help_panel=_MK)] = False,
    device: Annotated[str, typer.Option(help="SAM2 (and --text detector) device: auto, cpu or cuda.",
                                        rich_help_panel=_MK)] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace a workspace made from another clip or frame "
                                                        "selection.", rich_help_panel=_OUT)] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Create a workspace from CLIP and print its path.

    Example: vd mask bear.mp4 --box 120,80,400,460   then   vd invert bear.vd --prompt "a brown bear walking"

    Two objects: vd mask walk.mp4 --object man --box 40,60,200,500 --object dog="small dog" --text "small dog"
    """

    def work(progress):  # type: ignore[no-untyped-def]
        from stages.common.config import build_config, options
        from stages.mask.run import MaskConfig, parse_frames, run_mask

        objects = _objects(ctx.meta.get(RAW_ARGS, []), object_, point, box, text)
        single = not objects
        config = build_config(MaskConfig, options(dict(
            frames=parse_frames(frames), size=size, start=start, stride=stride, fps=fps, sample=sample, resize=resize,
            points=list(point or []) if single else [], box=_one("--box", box) if single else None,
            text=_one("--text", text) if single else None, subject=subject, objects=objects,
            detector=detector, text_threshold=text_threshold, prompt_frame=prompt_frame, sam2=sam2, device=device,
            mask_dir=mask_dir, mask_video=mask_video, box_only=box_only, ellipse=not no_ellipse, force=force)))
        return run_mask(clip, output, config, progress)

    def human(result: dict) -> None:  # type: ignore[type-arg]
        print(result["workspace"], flush=True)

    run(work, json_out, quiet, human)


def _one(flag: str, values: Optional[list[str]]) -> Optional[str]:
    """The single-object form takes one --box / --text."""
    from stages.common.errors import UsageError

    if values and len(values) > 1:
        raise UsageError(f"{flag} given {len(values)} times: one per object (name several with --object NAME)")
    return values[0] if values else None


def _objects(raw: list[str], names: Optional[list[str]], points: Optional[list[str]], boxes: Optional[list[str]],
             texts: Optional[list[str]]) -> list[dict[str, Any]]:
    """MaskConfig.objects from the command line's order, checked against what Click parsed."""
    from stages.common.errors import UsageError
    from stages.mask.objects import group_object_args

    if not names:
        return []
    objects = group_object_args(raw)
    seen = {"--object": [o["name"] + (f"={o['phrase']}" if o["phrase"] else "") for o in objects],
            "--point": [p for o in objects for p in o["points"]],
            "--box": [o["box"] for o in objects if o["box"] is not None],
            "--text": [o["text"] for o in objects if o["text"] is not None]}
    parsed = {"--object": names, "--point": points or [], "--box": boxes or [], "--text": texts or []}
    for flag, values in parsed.items():
        if len(seen[flag]) != len(values):  # an option's value that looks like a flag, e.g. `--text --box`
            raise UsageError(f"could not tell which object each {flag} belongs to; write every --object NAME "
                             f"followed by its own --point/--box/--text")
    return objects
