"""vd stages: everything that does work (the CLI in vdcli/ only parses and prints)."""

__version__ = "0.1.0"
