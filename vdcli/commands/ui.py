"""`vd ui [ROOT]`: the local web page over the workspaces under ROOT (needs the extra `vd[ui]`: Gradio)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vdcli.common import app, run


@app.command("ui")
def ui_command(
    root: Annotated[Optional[Path], typer.Argument(
        metavar="ROOT", show_default=False,
        help="The folder the page may read and write: clips, uploads and workspaces (default: the current "
             "folder). Paths outside it are refused.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but 127.0.0.1/localhost "
                                                     "needs --auth.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 7860,
    auth: Annotated[Optional[str], typer.Option(
        "--auth", metavar="USER:PASS", show_default=False,
        help="Require this login (default: $VD_UI_AUTH).")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", metavar="SPEC", show_default=False,
        help="Model for Invert (as vd invert --model; default: the stored inversion's, else "
             "sd15-animatediff-v3).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N] for every stage.")] = "auto",
    sam2: Annotated[str, typer.Option(
        "--sam2", help="SAM2 checkpoint for Track (as vd mask --sam2): auto, tiny, small, base_plus, large, a "
                       ".pt path, or random (untrained; tests only).")] = "auto",
    max_upload: Annotated[str, typer.Option("--max-upload", metavar="SIZE",
                                            help="Largest clip the page accepts as an upload.")] = "500MB",
) -> None:
    """Serve the page (Clip, Objects, Invert, Edit, Export) on http://HOST:PORT until Ctrl-C.

    Every action calls the stage the CLI runs and shows the equivalent vd command line.
    Example: vd ui ~/clips   then open http://127.0.0.1:7860
    """

    def work(progress: Any) -> dict[str, Any]:
        from stages.common.errors import UsageError
        from vdcli.ui.paths import Root, parse_bytes
        from vdcli.ui.server import ServeOptions, check, serve

        options = ServeOptions(Root(root if root is not None else Path.cwd()).path, host, port, auth, model,
                               device, sam2, parse_bytes(max_upload))
        check(options)  # one line before the (slow) Gradio import
        try:
            import gradio  # noqa: F401
        except ModuleNotFoundError:
            raise UsageError("vd ui needs Gradio: pip install 'vd[ui]' (or pip install gradio)") from None
        serve(options, block=True)
        return {}

    run(work, json_out=False, quiet=False)
