"""`vd eval --compare` by inversion method (`vd invert --method`): the clips grouped by how they were
inverted, with each method's inversion time and reconstruction against the VAE ceiling, side by side."""

from __future__ import annotations

from typing import Any

from stages.evaluate.config import RECON
from stages.io.workspace import Workspace


def inversion_facts(ws: Workspace) -> dict[str, Any]:
    """The stored inversion's method ("null-text" for inversions made before --method), its wall time and
    its reconstruction PSNR next to the VAE-only ceiling (from `vd invert`'s own report)."""
    attrs = ws.group_attrs("inversion")
    recon = attrs.get("recon") if isinstance(attrs.get("recon"), dict) else {}
    timings = attrs.get("timings") if isinstance(attrs.get("timings"), dict) else {}
    facts: dict[str, Any] = {"method": str(attrs.get("method") or "null-text") if attrs else None,
                             "invert_s": timings.get("total_s"), "recon_psnr": recon.get("psnr"),
                             "vae_psnr": recon.get("vae_psnr")}
    if isinstance(facts["recon_psnr"], (int, float)) and isinstance(facts["vae_psnr"], (int, float)):
        facts["below_vae_db"] = float(facts["vae_psnr"]) - float(facts["recon_psnr"])
    return facts


def split_by_method(facts: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """{method: clips} from {clip: inversion_facts}, null-text first; clips without an inversion are left out."""
    methods: dict[str, list[str]] = {}
    for clip, fact in facts.items():
        if fact.get("method"):
            methods.setdefault(fact["method"], []).append(clip)
    return {m: methods[m] for m in sorted(methods, key=lambda m: (m != "null-text", m))}


def method_columns(methods: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One column per method for the side-by-side table: inversion facts, then the reconstruction's and all
    edits' mean metrics (row keys prefixed "recon " / "edits ")."""
    columns: dict[str, dict[str, Any]] = {}
    for method, entry in methods.items():
        col: dict[str, Any] = dict(entry["inversion"]["metrics"])
        for group, prefix in ((RECON, "recon "), ("all edits", "edits ")):
            for key, value in ((entry["groups"].get(group) or {}).get("metrics") or {}).items():
                col[prefix + key] = value
        columns[f"{method} n={len(entry['clips'])}"] = col
    return columns
