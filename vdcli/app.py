"""`vd` entry point. Each subcommand lives in vdcli/commands/<name>.py and registers itself on `app`."""

from __future__ import annotations

import importlib

from vdcli.common import app

COMMANDS = ["mask", "info", "models", "invert", "edit", "export", "eval", "demo", "batch", "ui"]

for _name in COMMANDS:
    try:
        importlib.import_module(f"vdcli.commands.{_name}")
    except ModuleNotFoundError as exc:  # a command not built yet in this checkout
        if exc.name != f"vdcli.commands.{_name}":
            raise


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
