"""Which pixels an edit changed, per frame, in workspace coordinates (what the export pastes back).

- a region edit (`vd edit --region NAME=...`): the union of the edited objects' masks/objects/<name>/edit;
- a background edit (`--background`): the complement of masks/edit;
- a first-frame edit (`--first-frame`): the whole frame (the edited image may change anything);
- any other edit: masks/edit, or the whole frame when the workspace has no mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.common.errors import InputError
from stages.io.workspace import Workspace, check_name

KINDS = ("subject", "objects", "background", "whole")


@dataclass(frozen=True)
class EditRegion:
    """kind (KINDS) and the workspace mask arrays whose union (complement for "background") it is."""

    kind: str
    arrays: tuple[str, ...] = ()
    opened: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # name -> zarr array

    def frame(self, ws: Workspace, k: int) -> np.ndarray | None:
        """Bool (H, W) region of frame k; None means the whole frame."""
        if self.kind == "whole":
            return None
        union = None
        for name in self.arrays:
            arr = self.opened.get(name)
            if arr is None:  # opened once, read frame by frame
                arr = self.opened[name] = ws.array(name)
            try:
                m = np.asarray(arr[k]) > 0
            except Exception as exc:  # a chunk that does not decode
                raise ws.damaged(name, exc) from None
            union = m if union is None else union | m
        return ~union if self.kind == "background" else union


def edit_region(ws: Workspace, attrs: dict[str, Any]) -> EditRegion:
    """The region of the edit whose group attrs are `attrs` (see the module docstring)."""
    params = attrs.get("params") or {}
    if params.get("regions"):
        names = [check_name(str(n)) for n in params["regions"]]
        arrays = tuple(f"masks/objects/{n}/edit" for n in names)
        missing = [a for a in arrays if not ws.has(a)]
        if missing:
            raise InputError(f"the region edit's object mask {missing[0]} is missing from {ws.path}; "
                             f"redo `vd mask` and the edit")
        return EditRegion("objects", arrays)
    if params.get("first_frame") or attrs.get("first_frame"):
        return EditRegion("whole")
    if not ws.has("masks/edit"):
        if params.get("background"):
            raise InputError(f"a background edit needs masks/edit, which {ws.path} lacks; rerun `vd mask`")
        return EditRegion("whole")
    return EditRegion("background" if params.get("background") else "subject", ("masks/edit",))
