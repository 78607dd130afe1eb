"""What every subcommand shares: the Typer app, common options, error handling, output."""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Annotated, Any, Callable

import typer

from stages.errors import Interrupted, VdError
from stages.progress import Progress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="vd: precise text-driven video editing (VideoDirector on AnimateDiff).\n\n"
    "Pipeline: vd mask CLIP -> vd invert WS -> vd edit WS -> vd eval WS. Each stage reads and writes one workspace.",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable results (JSON) on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or status output on stderr.")]


def fail(message: str, code: int) -> None:
    """Print a one-line error on stderr and exit with `code`."""
    print(f"vd: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def run(work: Callable[[Progress], dict[str, Any]], json_out: bool, quiet: bool,
        human: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run a stage with user-facing error handling; print JSON or the human summary."""
    from stages.quiet import silence_libraries

    silence_libraries()
    progress = Progress(quiet=quiet)
    try:
        result = work(progress)
    except Interrupted as exc:
        fail(str(exc), exc.exit_code)
    except VdError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; finished work is kept in the workspace, rerun to resume", 130)
    except Exception as exc:  # unexpected: keep it one line unless debugging
        if os.environ.get("VD_DEBUG"):
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        fail(f"unexpected {type(exc).__name__}: {first} (set VD_DEBUG=1 for a traceback)", 1)
    if json_out:
        from stages.workspace import json_safe

        print(json.dumps(json_safe(result), indent=2, default=str, allow_nan=False), flush=True)
    elif human is not None:
        human(result)
    return result
