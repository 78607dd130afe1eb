"""`vd info WS`: what each stage left in a workspace, with sizes on disk."""

from __future__ import annotations

from typing import Annotated

import typer

from vdcli.common import JsonOpt, QuietOpt, app, fail, run


@app.command("info")
def info(
    workspace: Annotated[str, typer.Argument(help="Workspace directory (made by `vd mask`).", show_default=False)],
    check: Annotated[bool, typer.Option(
        "--check", help="Also decode every chunk of every array and check the stages' done flags and shapes; "
                        "exit 3 when something is damaged (listed under `check` with --json).")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Summarise a workspace: source, frames, masks, inversion, edits, eval, sizes."""

    def work(progress):  # type: ignore[no-untyped-def]
        from stages.info import check_workspace, run_info, staleness
        from stages.io.workspace import Workspace

        if not check:
            return run_info(workspace)
        stale = staleness(Workspace.open(workspace))  # reads and hashes the arrays: once for both
        return {**run_info(workspace, stale), "check": check_workspace(workspace, stale)}

    def human(result: dict) -> None:  # type: ignore[type-arg]
        from stages.info import format_check, format_info

        lines = format_info(result)
        if "check" in result:
            lines += format_check(result["check"])
        print("\n".join(lines), flush=True)

    result = run(work, json_out, quiet, human)
    damage = (result.get("check") or {}).get("problems") or []
    if damage:
        first = damage[0]
        more = f" and {len(damage) - 1} more" if len(damage) > 1 else ""
        fail(f"workspace {workspace} is damaged: {first['name']} {first['problem']}{more}; {first['fix']}", 3)
