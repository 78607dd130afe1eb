"""`vd info WS`: what each stage left in a workspace, with sizes on disk."""

from __future__ import annotations

from typing import Annotated

import typer

from vdcli.common import JsonOpt, QuietOpt, app, run


@app.command("info")
def info(
    workspace: Annotated[str, typer.Argument(help="Workspace directory (made by `vd mask`).", show_default=False)],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Summarise a workspace: source, frames, masks, inversion, edits, eval, sizes."""

    def work(progress):  # type: ignore[no-untyped-def]
        from stages.info import run_info

        return run_info(workspace)

    def human(result: dict) -> None:  # type: ignore[type-arg]
        from stages.info import format_info

        print("\n".join(format_info(result)), flush=True)

    run(work, json_out, quiet, human)
