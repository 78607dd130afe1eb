"""What `vd batch` redoes for a clip, decided by the stages' own freshness rules (each stage's
`is_current`): the batch adds only how to redo an inversion (resume its unfinished steps, or restart it), the
model identity, which it knows without loading the model (stages.models.resolve.model_identity), and which
edits' exports to write (stages.export.is_current, one export per edit at its default output).
"""

from __future__ import annotations

from typing import Any

from stages.common.config import changed_settings


def invert_action(ws: Any, cfg: Any, identity: str) -> tuple[str, str]:
    """What to do with the workspace's inversion for `cfg` and the current model `identity`: ("skip", ""),
    ("new", why), ("update", why: complete, only its labels differ, e.g. the subject: run_invert stores them
    without a model), ("resume", why: same settings, unfinished) or ("restart", why: other settings, other
    frames or masks, other model content)."""
    from stages.invert import GROUP, is_current, stored_settings
    from stages.invert.store import only_relabels
    from stages.models.identity import is_legacy, legacy_message

    fresh, why = is_current(ws, cfg, identity)
    stored = ws.group_attrs(GROUP).get("settings") or {}
    if not stored:
        return "new", why or "no inversion yet"
    made_with = stored.get("model_fingerprint")
    if made_with and is_legacy(made_with):
        return "restart", legacy_message(made_with, str(ws.path)).split(";")[0]
    if made_with and made_with != identity:
        return "restart", f"the model's content changed ({made_with} -> {identity})"
    if fresh:
        return "skip", ""
    if only_relabels(ws, cfg, identity):
        return "update", why
    if not ws.has("video/frames"):
        return "new", why
    frames = ws.read("video/frames")
    mask = ws.read("masks/edit") if ws.has("masks/edit") else None
    new = stored_settings(cfg, frames, mask)
    old = {"method": "null-text", **stored}  # inversions made before `vd invert --method` are null-text ones
    if changed_settings({k: v for k, v in old.items() if k in new}, new):
        return "restart", why
    return "resume", why


def export_plan(ws: Any, template: Any, names: list[str],
                source: str | None) -> tuple[list[tuple[Any, str]], list[str]]:
    """The exports of edits `names` with the manifest's settings `template` (stages.export.ExportConfig):
    ([(config, why) to run], [names already current]). Each edit goes to its default output
    (WS/edits/NAME/export.*), reading the clip from `source` (the local copy); an output left by an older
    export is replaced (force)."""
    import dataclasses

    from stages.export import is_current

    todo, done = [], []
    for name in names:
        cfg = dataclasses.replace(template, edit=name, output=None, source=source, force=True)
        fresh, why = is_current(ws, cfg)
        if fresh:
            done.append(name)
        else:
            todo.append((cfg, why))
    return todo, done
