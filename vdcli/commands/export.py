"""`vd export`: composite a finished edit back into the source clip (size, frame rate, rotation, colour tags,
audio), with the background untouched. Prints only the output path (docs/commands/export.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vdcli.common import JsonOpt, QuietOpt, app, run

_IN, _OUT, _BLEND = "Input", "Output", "Blending"


@app.command("export")
def export_command(
    workspace: Annotated[Path, typer.Argument(metavar="WS", show_default=False,
                                              help="Workspace with a finished edit (vd edit).")],
    edit: Annotated[Optional[str], typer.Option(
        "--edit", "-e", metavar="NAME", rich_help_panel=_IN,
        help="Edit to export (default: the workspace's only finished edit).")] = None,
    source: Annotated[Optional[Path], typer.Option(
        "--source", metavar="PATH", rich_help_panel=_IN,
        help="The source clip, when it moved since vd mask (its sha256 must match).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="OUT", rich_help_panel=_OUT,
        help="Output file (a folder with --codec png). (default WS/edits/NAME/export.mp4; .mov for prores, "
             ".mkv for ffv1, export/ for png)")] = None,
    codec: Annotated[str, typer.Option(
        "--codec", rich_help_panel=_OUT, help="h264, h265, prores, ffv1 (lossless RGB) or png (folder of %06d.png).")
    ] = "h264",
    crf: Annotated[Optional[int], typer.Option(
        "--crf", metavar="N", rich_help_panel=_OUT, help="Quality of h264/h265 (0-51, lower is better). "
                                                         "(default 18 for h264, 20 for h265)")] = None,
    audio: Annotated[str, typer.Option(
        "--audio", rich_help_panel=_OUT, help="copy: the source's audio of the exported span; none: no audio.")
    ] = "copy",
    whole_clip: Annotated[bool, typer.Option(
        "--whole-clip", rich_help_panel=_OUT,
        help="Write the whole source clip: the edited span composited, every other frame and the audio as they are.")
    ] = False,
    feather: Annotated[Optional[int], typer.Option(
        "--feather", metavar="PX", rich_help_panel=_BLEND,
        help="Grow the edited region by PX source pixels, then fade over PX more. (default 1/128 of the "
             "shorter side, at least 2: 8 at 1080p)")] = None,
    color_match: Annotated[str, typer.Option(
        "--color-match", metavar="on|off", rich_help_panel=_BLEND,
        help="Match the edit's colour to the source on a ring around the region (gain and offset per channel).")
    ] = "on",
    force: Annotated[bool, typer.Option("--force", rich_help_panel=_OUT, help="Replace an existing output.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Put the edit back into the source footage: the inverse of the workspace's resize, a feathered paste
    over the decoded source frames, the source's frame rate, rotation, colour tags and audio.

    Example: vd export bear.vd --edit tiger -o tiger.mp4
    """

    def work(progress: Any) -> dict[str, Any]:
        from stages.common.config import build_config, options
        from stages.common.errors import UsageError

        if color_match not in ("on", "off"):
            raise UsageError(f"--color-match {color_match!r}: choose on or off")
        from stages.export import ExportConfig, run_export

        cfg = build_config(ExportConfig, options({
            "edit": edit, "output": str(output) if output else None,
            "source": str(source) if source else None, "codec": codec, "crf": crf, "audio": audio,
            "whole_clip": whole_clip, "feather": feather, "color_match": color_match == "on", "force": force,
        }))
        return run_export(workspace, cfg, progress)

    run(work, json_out, quiet, lambda result: print(result["output"], flush=True))
