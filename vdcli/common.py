"""What every subcommand shares: the Typer app, common options, error handling, output."""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperGroup
from typer.core import _click as click  # the click Typer runs on (its own vendored copy in typer >= 0.24)

from stages.common.errors import Interrupted, VdError, first_line
from stages.common.progress import Progress

class OneLineErrors(TyperGroup):
    """The `vd` group: usage errors (unknown option, missing argument, `--steps five`) print one line
    `vd: error: ...` on stderr (exit 2) instead of Typer's boxed usage text; --help is unchanged."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `vd`: the help was printed
            sys.exit(exc.exit_code)
        except click.exceptions.ClickException as exc:
            print(f"vd: error: {usage_message(exc)}", file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("vd: error: aborted", file=sys.stderr, flush=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)  # a typer.Exit(code) comes back as its code


def usage_message(exc: click.exceptions.ClickException) -> str:
    """A click error as one line, with where to find help."""
    text = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.exceptions.UsageError) and ctx is not None:
        text += f" (see `{ctx.command_path} --help`)"
    return text


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="vd: precise text-driven video editing (VideoDirector on AnimateDiff).\n\n"
    "Pipeline: vd mask CLIP -> vd invert WS -> vd edit WS -> vd eval WS. Each stage reads and writes one workspace.",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable results (JSON) on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or status output on stderr.")]
# `--dry-run` planning (vd invert, vd edit; stages.invert.plan.plan_inputs checks them)
PlanForOpt = Annotated[Optional[str], typer.Option(
    "--plan-for", metavar="12GB|16GB|24GB|40GB|80GB|<N>GiB", rich_help_panel="Runtime",
    help="With --dry-run, from any machine: plan for a GPU of this size (CUDA, bf16 unless --dtype): peak per "
         "pass, whether it fits, a time estimate.")]
PlanFramesOpt = Annotated[Optional[int], typer.Option(
    "--frames", metavar="N", rich_help_panel="Runtime",
    help="With --dry-run: plan for a clip of N frames (with --size: no workspace needed).")]
PlanSizeOpt = Annotated[Optional[str], typer.Option(
    "--size", metavar="N|WxH", rich_help_panel="Runtime",
    help="With --dry-run: plan for frames of this size, e.g. 512 or 768x512.")]


def fail(message: str, code: int) -> None:
    """Print a one-line error on stderr and exit with `code`."""
    print(f"vd: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def run(work: Callable[[Progress], dict[str, Any]], json_out: bool, quiet: bool,
        human: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run a stage with user-facing error handling; print JSON or the human summary."""
    from stages.common.quiet import silence_libraries

    silence_libraries()
    progress = Progress(quiet=quiet)
    try:
        result = work(progress)
    except Interrupted as exc:
        fail(str(exc), exc.exit_code)
    except VdError as exc:
        fail(first_line(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; finished work is kept in the workspace, rerun to resume", 130)
    except Exception as exc:  # unexpected: keep it one line unless debugging
        if os.environ.get("VD_DEBUG"):
            traceback.print_exc()
        from stages.models.oom import is_oom, out_of_memory

        if is_oom(exc):  # a stage without its own answer (stages.models.oom): still one line, exit 5
            err = out_of_memory(exc)
            fail(first_line(err), err.exit_code)
        fail(f"unexpected {type(exc).__name__}: {first_line(str(exc))} (set VD_DEBUG=1 for a traceback)", 1)
    if json_out:
        from stages.common.jsonsafe import json_safe

        print(json.dumps(json_safe(result), indent=2, default=str, allow_nan=False), flush=True)
    elif human is not None:
        human(result)
    return result
