"""Whether a stored export answers its settings: the rule `vd batch` uses to skip an export."""

from __future__ import annotations

from pathlib import Path

from stages.common.config import changed_settings
from stages.common.errors import InputError
from stages.export.config import ExportConfig, auto_feather, default_output, validate
from stages.io.workspace import Workspace


def is_current(ws: Workspace, cfg: ExportConfig) -> tuple[bool, str]:
    """(True, "") when `run_export(ws, cfg)` would write what is already there, else (False, why).

    Current: the output exists, the edit's record for that output has the same settings (codec, crf,
    audio, whole clip, feather, colour match, source sha256), the edit is unchanged since (its attrs), the
    masks it pastes with are the ones the edit read, and the edit itself is not stale. Reads only; the source
    is not decoded (its sha256 was compared when the export ran)."""
    from stages.edit.fresh import stale_reason
    from stages.export.region import edit_region
    from stages.export.run import edit_identity, export_key, export_settings, masks_changed, pick_edit
    from stages.io.reads import Reads

    validate(cfg)
    try:
        name = pick_edit(ws, cfg.edit)
    except InputError as exc:
        return False, str(exc)
    out = Path(cfg.output).expanduser() if cfg.output else default_output(ws.path, name, cfg.codec)
    attrs = ws.group_attrs(f"edits/{name}")
    record = (attrs.get("exports") or {}).get(export_key(ws.path, out))
    if not record:
        return False, f"edit {name!r} has no export at {out}"
    if not out.exists():
        return False, f"the export {out} is gone"
    source = ws.attrs.get("source") or {}
    stored = record.get("settings") or {}
    feather = cfg.feather
    if feather is None:  # the default depends on the source size, recorded by vd mask
        size = source.get("source_size")
        feather = auto_feather((int(size[0]), int(size[1]))) if size else stored.get("feather")
    changed = changed_settings(stored, export_settings(cfg, feather, source))
    if changed:
        return False, f"the export {out} was made with other settings ({', '.join(changed)})"
    if record.get("edit") != edit_identity(attrs):
        return False, f"edit {name!r} was redone after the export {out}"
    reads = Reads(ws)  # one digest of each array for both checks
    changed = masks_changed(ws, attrs, edit_region(ws, attrs).arrays, reads)
    if changed:
        return False, f"{', '.join(changed)} changed since edit {name!r} was made"
    why = stale_reason(ws, name, reads)
    if why:
        return False, f"edit {name!r} is stale ({why})"
    return True, ""
