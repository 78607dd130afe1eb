"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""

from __future__ import annotations


class VdError(Exception):
    """Base class: a problem with a clear one-line message (never a traceback)."""

    exit_code = 1


class UsageError(VdError):
    """Options that contradict each other or are malformed."""

    exit_code = 2


class InputError(VdError):
    """Input not found or invalid: files, workspaces, masks, prompts."""

    exit_code = 3


class ModelMissingError(VdError):
    """Model weights are not present locally; the message says how to get them."""

    exit_code = 4


class OutOfMemory(VdError):
    """The device ran out of memory; the message names the need, the device's memory and what reduces it.

    Permanent for the same settings: `vd batch` does not retry it.
    """

    exit_code = 5


class Transient(VdError):
    """A condition that passes by itself: another writer holds a remote workspace's lease, a damaged scratch
    copy must be pulled again. Nothing is wrong with the input; `vd batch --retry` retries it, and rerunning
    the same command resumes."""

    exit_code = 1


class Interrupted(VdError):
    """Ctrl-C: finished work is saved and the stage can resume."""

    exit_code = 130


def first_line(exc: BaseException | str) -> str:
    """An exception (or message) as one line: its first non-empty line, else the exception's type name."""
    lines = str(exc).strip().splitlines()
    if lines:
        return lines[0]
    return type(exc).__name__ if isinstance(exc, BaseException) else ""
