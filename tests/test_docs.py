"""The documentation cannot drift: every command's options are on its page, and the site builds strictly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer.main

from vdcli.app import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "commands"


def command_options() -> dict[str, list[str]]:
    """Every long option of every `vd` command, from the same click objects `vd CMD --help` prints."""
    group = typer.main.get_command(app)
    return {name: [o for p in command.params if getattr(p, "param_type_name", "") == "option"
                   for o in p.opts + p.secondary_opts if o.startswith("--") and o != "--help"]
            for name, command in group.commands.items()}


def undocumented(options: list[str], page_text: str) -> list[str]:
    """The options a page never names as a word (`--x`, `--x ARG`, `--x=...`, `[--x`)."""
    return [o for o in options if not any(f"{o}{end}" in page_text for end in ("`", " ", "=", "]", "\n", ",", "/"))]


def test_every_command_has_a_page_naming_each_of_its_options():
    missing = []
    for name, options in command_options().items():
        page = PAGES / f"{name}.md"
        if not page.is_file():
            missing.append(f"{name}: no page docs/commands/{name}.md")
            continue
        missing += [f"{name}: {o}" for o in undocumented(options, page.read_text())]
    assert not missing, "options missing from their docs page:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_or_prefix_only_option():
    text = "Use `--frames 8` and [--size PX]."
    assert undocumented(["--frames", "--size", "--fps", "--frame"], text) == ["--fps", "--frame"]
    assert "--prompt" in command_options()["edit"]


def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is part of the dev install"
    done = subprocess.run([mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "commands" / "edit" / "index.html").is_file()


def test_every_page_the_code_points_at_exists():
    """Docstrings and comments name docs/*.md and notes/*.md pages; each must exist (pages move)."""
    import re

    pattern = re.compile(r"\b((?:docs|notes)/[\w./-]+?\.md)\b")
    missing = []
    for folder in ("stages", "vdcli", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for ref in pattern.findall(path.read_text()):
                if not (ROOT / ref).is_file():
                    missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert missing == []
