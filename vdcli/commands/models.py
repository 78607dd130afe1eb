"""`vd models`: which model weights are present locally, how to get the missing ones, and `--get` to
download them."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from vdcli.common import JsonOpt, QuietOpt, app, run

# `vd models` component name -> the `vd models --get` name that fetches it
GET_NAMES = {"sd15": "sd15", "motion_adapter": "motion-adapter", "sam2-tiny": "sam2-tiny", "sam2-small": "sam2-small",
             "sam2-base_plus": "sam2-base_plus", "sam2-large": "sam2-large", "sparsectrl-rgb": "sparsectrl-rgb",
             "grounding-dino": "grounding-dino"}


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


def _human_get(result: dict[str, Any]) -> None:
    from stages.models.fetch import human_size

    for item in result["files"]:
        if item["status"] == "skipped":
            note = "not in the repo; optional"
        else:
            note = human_size(item["size"]) if item["size"] is not None else "size unknown"
            note += f", {item['verified']} verified" if item.get("verified") else ""
        print(f"{item['status']:<10} {item['file']} ({note})")
    print(f"{result['downloaded']} downloaded ({human_size(result['bytes'])}), {result['cached']} already present, "
          f"{result['skipped']} not in their repo (optional); `vd models` lists them")


def _status() -> dict[str, Any]:
    from stages.models.status import eval_status, models_status

    result = models_status()
    for comp in result["components"]:
        name = GET_NAMES.get(comp["name"])
        if name:
            comp["fetch"] = f"vd models --get {name}"
            if not comp["present"]:
                comp["get"] = f"vd models --get {name}; or {comp['get']}"
    result["components"] += eval_status()
    return result


@app.command("models")
def models_command(
    names: Annotated[Optional[list[str]], typer.Argument(
        metavar="NAME", show_default=False,
        help="With --get: all, sd15, motion-adapter, sam2 (= sam2-large), sam2-tiny, sam2-small, sam2-base_plus, "
             "sam2-large, clip, pickscore, lpips, sparsectrl-rgb (commas work too).")] = None,
    get: Annotated[bool, typer.Option(
        "--get", help="Download the named weights (only the files vd uses) into the Hugging Face cache "
                      "(through huggingface_hub) or ~/.cache/vd (LPIPS); each file checked against its published "
                      "size and sha256.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List which weights are present locally (Hugging Face cache, VD_SD15, VD_MOTION_ADAPTER, SAM2, evaluation
    models) and how to get the missing ones. With --get NAME..., download them."""
    if names and not get:
        from vdcli.common import fail

        fail(f"names ({' '.join(names)}) need --get: vd models --get {' '.join(names)}", 2)
    if not get:
        run(lambda progress: _status(), json_out, quiet, _human)
        return

    def work(progress: Any) -> dict[str, Any]:
        from stages.models.fetch import DownloadFailed, get as fetch

        try:
            return fetch(names or [], progress)
        except DownloadFailed as exc:
            if json_out:  # per-file results on stdout even when some failed; the one-line error follows
                from stages.io.workspace import json_safe

                print(json.dumps(json_safe(exc.result), indent=2, default=str), flush=True)
            raise

    run(work, json_out, quiet, _human_get)
