"""What a stage read from a workspace, by content: the one freshness rule (docs/concepts/freshness.md).

A stage records the digest of every workspace array it reads (`Reads.of(names)`, stored with its result); its
result is stale as soon as one of them differs from the array's current content (`Reads.changed`). Digests
are stages.common.digest of the array's bytes, the form `vd invert` has always stored for frames and masks.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from stages.common.digest import digest
from stages.io.workspace import Workspace


class Reads:
    """Digests of one workspace's arrays, each array read at most once (a check of several results reads the
    frames once). None stands for an array that is not there."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self._seen: dict[str, str | None] = {}

    def digest(self, name: str) -> str | None:
        """The digest of array `name`'s content (None when absent); a damaged array raises InputError."""
        if name not in self._seen:
            self._seen[name] = digest(self.ws.read(name)) if self.ws.has(name) else None
        return self._seen[name]

    def of(self, names: Iterable[str]) -> dict[str, str | None]:
        """{name: digest} of the arrays a stage is about to read (what it stores with its result)."""
        return {name: self.digest(name) for name in dict.fromkeys(names)}

    def changed(self, recorded: Mapping[str, Any] | None) -> list[str]:
        """The arrays of a recorded {name: digest} whose content is no longer the recorded one."""
        return [name for name, value in (recorded or {}).items() if self.digest(name) != value]


def describe_changed(names: list[str]) -> str:
    """'masks/edit changed' / 'video/frames and masks/edit changed' (one line, for the why of a stale result)."""
    shown = names if len(names) <= 3 else names[:3] + [f"{len(names) - 3} more"]
    listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
    return f"{listed} changed since it was made"
