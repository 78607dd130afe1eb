"""Whether an edit stored in a workspace is current (docs/concepts/freshness.md).

An edit records what it read (stages.edit.run.read_record): attrs `inversion` (stages.invert.store.inversion_id:
the inversion's settings hash and the id of the run that made it), `reads` ({array: digest} of video/frames and
the masks it reads: masks/edit with SA-II, every object's masks for regions), `subject` (the inversion subject
its prompt replaced, None when it replaced none), `resolved_prompt`, `words`, `params` and the first-frame
image's sha256.

`stale_reason` (no settings needed: `vd info`, `vd eval`) says whether what it read changed; `is_current`
(`vd batch`) also compares the settings. Edits made before a record existed are judged on what they recorded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from stages.common.config import changed_settings, config_dict
from stages.common.errors import InputError
from stages.invert.store import inputs_changed, inversion_id
from stages.io.reads import Reads, describe_changed
from stages.io.workspace import Workspace

RUNTIME = ("force", "device", "dtype", "output", "name")  # never change an edit's frames (name: its group)


def _made(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in RUNTIME}


def stale_reason(ws: Workspace, name: str, reads: Reads | None = None,
                 inversion: dict[str, Any] | None = None) -> str:
    """"" when what the finished edit `name` read is unchanged, else why it is stale: its inversion was
    redone or is itself stale, an array it read changed, or the subject its prompt replaced changed.
    `inversion`: the inversion's group attrs (read when None); `reads` shares digests between checks."""
    stored = ws.group_attrs(f"edits/{name}")
    reads = reads or Reads(ws)
    inv = ws.group_attrs("inversion") if inversion is None else inversion
    made_from = stored.get("inversion")
    if made_from is not None:
        if not inv:
            return "its inversion is gone"
        if made_from != inversion_id(inv):
            return "made from another inversion"
        why = inputs_changed(ws, inv, reads)
        if why:
            return f"built on a stale inversion ({why})"
    changed = reads.changed(stored.get("reads"))
    if changed:
        return describe_changed(changed)
    if stored.get("subject") is not None and stored["subject"] != inv.get("subject"):
        return f"the inversion's subject changed ({stored['subject']!r} -> {inv.get('subject')!r})"
    return ""


def stale_fix(ws: Workspace, name: str) -> str:
    """The command that makes a stale edit current again."""
    return f"redo it with `vd edit {ws.path} --name {name} --force ...` (its prompt and options)"


def is_current(ws: Workspace, cfg: Any, inv: Any = None) -> tuple[bool, str]:
    """Whether `run_edits(ws, [cfg])` would make the stored edit again: (True, "") or (False, why).

    `inv`: the workspace's loaded inversion (load_inversion_for_edit), read when None. Reads only; a
    config that cannot work (a reweight word not in the prompt, ...) raises as plan_edit does."""
    from stages.edit.run import load_inversion_for_edit, plan_edit

    try:
        inv = load_inversion_for_edit(ws) if inv is None else inv
    except InputError as exc:
        return False, str(exc)
    job = plan_edit(ws, inv, dataclasses.replace(cfg, force=True))
    name = job.name
    stored = ws.group_attrs(f"edits/{name}")
    if not stored:
        return False, f"edit {name!r} not made yet"
    if stored.get("status") != "done" or not ws.has(f"edits/{name}/frames"):
        return False, f"edit {name!r} is unfinished"
    if stored.get("inversion") is None:
        return False, f"edit {name!r} was made by an older vd (no record of its inversion)"
    why = stale_reason(ws, name, inversion=inv.attrs)
    if why:
        return False, f"edit {name!r} is stale: {why}"
    changed = changed_settings(_made(stored.get("params") or {}), _made(config_dict(job.cfg)))
    if changed:
        return False, f"edit {name!r} was made with other settings ({', '.join(changed)})"
    if stored.get("resolved_prompt") is not None and stored["resolved_prompt"] != job.target:
        return False, f"edit {name!r} was made for another target prompt ({stored['resolved_prompt']!r})"
    if stored.get("reads") is None:
        return False, f"edit {name!r} was made by an older vd (no record of the masks it read)"
    if job.first_frame is not None and (stored.get("first_frame") or {}).get("sha256") != job.first_frame.sha256:
        return False, f"edit {name!r} was made from another first-frame image"
    return True, ""
