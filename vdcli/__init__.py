"""The `vd` command line: a thin Typer app over stages/."""
