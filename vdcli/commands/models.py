"""`vd models`: which model weights are present locally, and how to get the missing ones."""

from __future__ import annotations

import sys
from typing import Any

from vdcli.common import JsonOpt, QuietOpt, app, run


def _human(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold", expand=False)
    for column in ("component", "status", "location", "used by"):
        table.add_column(column, overflow="fold")
    for comp in result["components"]:
        status = "[green]present[/green]" if comp["present"] else "[red]missing[/red]"
        table.add_row(comp["name"], status, comp["path"] or "-", comp.get("used_by") or "")
    Console(file=sys.stdout).print(table)
    ready = ", ".join(f"{spec}: {'ready' if ok else 'weights missing'}" for spec, ok in result["specs"].items())
    print(f"model specs: {ready}")
    missing = [c for c in result["components"] if not c["present"]]
    if missing:
        print("how to get the missing weights:")  # plain print: commands stay on one copy-pasteable line
        for comp in missing:
            print(f"  {comp['name']}: {comp['get']}")


@app.command("models")
def models_command(json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List which weights are present locally (Hugging Face cache, VD_SD15, VD_MOTION_ADAPTER, SAM2) and how
    to get the missing ones. Nothing is downloaded."""

    def work(progress: Any) -> dict[str, Any]:
        from stages.models import models_status

        return models_status()

    run(work, json_out, quiet, _human)
