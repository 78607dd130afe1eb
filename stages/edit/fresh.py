"""Whether an edit stored in a workspace is current: same settings, finished, made from the workspace's
current inversion (edits record the inversion's config_hash as attrs `inversion`). Used by `vd batch`."""

from __future__ import annotations

import dataclasses
from typing import Any

from stages.common.config import changed_settings, config_dict
from stages.common.errors import InputError
from stages.io.workspace import Workspace

RUNTIME = ("force", "device", "dtype", "output", "name")  # never change an edit's frames (name: its group)


def _made(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in RUNTIME}


def is_current(ws: Workspace, cfg: Any, inv: Any = None) -> tuple[bool, str]:
    """Whether `run_edits(ws, [cfg])` would make the stored edit again: (True, "") or (False, why).

    `inv`: the workspace's loaded inversion (load_inversion_for_edit), read when None. Reads only; a
    config that cannot work (a reweight word not in the prompt, ...) raises as plan_edit does."""
    from stages.edit.run import load_inversion_for_edit, plan_edit

    if inv is None:
        try:
            inv = load_inversion_for_edit(ws)
        except InputError as exc:
            return False, str(exc)
    job = plan_edit(ws, inv, dataclasses.replace(cfg, force=True))
    name = job.name
    stored = ws.group_attrs(f"edits/{name}")
    if not stored:
        return False, f"edit {name!r} not made yet"
    if stored.get("status") != "done" or not ws.has(f"edits/{name}/frames"):
        return False, f"edit {name!r} is unfinished"
    changed = changed_settings(_made(stored.get("params") or {}), _made(config_dict(job.cfg)))
    if changed:
        return False, f"edit {name!r} was made with other settings ({', '.join(changed)})"
    if job.first_frame is not None and (stored.get("first_frame") or {}).get("sha256") != job.first_frame.sha256:
        return False, f"edit {name!r} was made from another first-frame image"
    made_from = stored.get("inversion")
    if made_from is None:
        return False, f"edit {name!r} was made by an older vd (no record of its inversion)"
    if made_from != inv.attrs.get("config_hash"):
        return False, f"edit {name!r} was made from another inversion"
    return True, ""
