"""Whether `vd eval`'s stored scores are current: one rule for `run_eval(reuse=True)` and `vd batch`.

Stored scores of an item (the reconstruction or an edit) are current when they were computed from the same
frames, masks, prompt and region, with the same scorer weights (for the seam metric: from the same export
of the edit), and cover every metric asked for. An item that is itself stale (an edit whose inputs changed, an
inversion whose frames or masks changed: docs/concepts/freshness.md) is never scored: `refuse_stale` names it
and the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages import __version__
from stages.common.digest import digest
from stages.common.errors import InputError
from stages.evaluate.config import OCCLUSION, RECON, EvalConfig, parse_metrics
from stages.evaluate.inputs import SourceClip, select_items, target_prompt
from stages.io.reads import Reads
from stages.io.workspace import Workspace
from stages.quality import metrics as M


def item_fingerprint(clip: SourceClip, frames: np.ndarray, attrs: dict[str, Any]) -> str:
    """The digest of what an item's scores read: its frames, the masks, its prompt and region."""
    return digest(frames, clip.mask, clip.raw, target_prompt(attrs),
                  (attrs.get("params") or {}).get("background", False))


def item_settings(clip: SourceClip, frames: np.ndarray, attrs: dict[str, Any], metrics: list[str],
                  weights: dict[str, Any]) -> dict[str, Any]:
    """What an item's scores depend on (stored as eval/<name> attrs `settings`); `attrs` are the edit's
    group attrs ({} for the reconstruction), `weights` the scorers' describe()."""
    settings = {"metrics": metrics, "weights": weights, "farneback": M.FARNEBACK, "occlusion": OCCLUSION,
                "fingerprint": item_fingerprint(clip, frames, attrs), "vd_version": __version__}
    if "seam" in metrics and attrs:  # the seam reads the edit's export: a new export is a new score
        from stages.evaluate.seam import export_identity

        settings["export"] = export_identity(clip.ws.path, attrs)
    return settings


def item_stale(ws: Workspace, name: str, reads: Reads | None = None) -> tuple[str, str]:
    """("", "") when item `name` (the reconstruction or a finished edit) is current, else (why, fix)."""
    from stages.edit.fresh import stale_fix, stale_reason
    from stages.invert.store import inputs_changed, stale_fix as invert_fix

    if name == RECON:
        why = inputs_changed(ws, reads=reads) if ws.group_attrs("inversion").get("settings") else ""
        return (f"the inversion is stale ({why})", invert_fix(ws)) if why else ("", "")
    why = stale_reason(ws, name, reads)
    return (f"edit {name!r} is stale ({why})", stale_fix(ws, name)) if why else ("", "")


def refuse_stale(ws: Workspace, names: list[str]) -> None:
    """InputError naming the first stale item among `names` and its fix (stale work is never scored)."""
    reads = Reads(ws)
    stale = [(name, *item_stale(ws, name, reads)) for name in names]
    stale = [s for s in stale if s[1]]
    if stale:
        _name, why, fix = stale[0]
        more = f" (also stale: {', '.join(s[0] for s in stale[1:])})" if len(stale) > 1 else ""
        raise InputError(f"{ws.path}: {why}; {fix}{more}")


def stored_fresh(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether stored settings (eval/<name> attrs `settings`) still answer `current` (item_settings)."""
    return (stored.get("fingerprint") == current["fingerprint"]
            and set(current["metrics"]) <= set(stored.get("metrics", []))
            and stored.get("weights") == current["weights"]
            and ("seam" not in current["metrics"] or stored.get("export") == current.get("export")))


def is_current(ws: Workspace, cfg: EvalConfig, scorers: Any = None) -> tuple[bool, str]:
    """Whether run_eval(ws, cfg, reuse=True) would reuse every stored score: (True, "") or (False, why).

    Reads only (no scorer weights are loaded: `scorers` or Scorers(cfg) gives only their paths)."""
    from stages.evaluate.scorers import Scorers

    metrics = parse_metrics(cfg.metrics)
    try:
        targets, _ = select_items(ws, cfg, metrics)
        clip = SourceClip(ws)
    except InputError as exc:
        return False, str(exc)
    weights = (scorers or Scorers(cfg)).describe()
    reads = Reads(ws)
    for name in targets:
        why, _fix = item_stale(ws, name, reads)
        if why:
            return False, why
        stored = ws.group_attrs(f"eval/{name}").get("settings")
        if not stored:
            return False, f"{name} is not evaluated yet"
        attrs = {} if name == RECON else ws.group_attrs(f"edits/{name}")
        current = item_settings(clip, clip.frames(name), attrs, metrics, weights)
        if not stored_fresh(stored, current):
            what = ("its frames, masks or prompt changed" if stored.get("fingerprint") != current["fingerprint"]
                    else "other scorer weights" if stored.get("weights") != current["weights"]
                    else "the edit's export changed" if stored.get("export") != current.get("export")
                    else "metrics not computed yet")
            return False, f"the scores of {name} are stale ({what})"
    return True, ""
