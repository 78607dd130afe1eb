"""`vd models`: which weights are present locally and how to get the missing ones. Nothing is loaded or
downloaded, and nothing heavy is imported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stages.common.errors import ModelMissingError
from stages.models import catalog
from stages.models.catalog import (ADAPTER_GET, ADAPTER_REPO, DEFAULT_SPEC, ENV_CLIP, ENV_LPIPS, ENV_MOTION_ADAPTER,
                                   ENV_PICKSCORE, ENV_PICKSCORE_PROCESSOR, ENV_SAM2_DIR, ENV_SD15, ENV_SD15_CONFIG,
                                   HF_ENV, SD15_GET, SD15_REPO, TARGETS, V3_CKPT_URL, HubFile, UrlFile)
from stages.models.layout import adapter_folder_ok, sd15_folder_problem


def _component(name: str, present: bool, path: Path | str | None, source: str, get: str, **extra: Any) -> dict:
    return {"name": name, "present": bool(present), "path": str(path) if path else None, "source": source,
            "get": None if present else get, **extra}


def _sd15_status(paths: dict[str, Any]) -> dict[str, Any]:
    explicit = paths.get("sd15") or os.environ.get(ENV_SD15)
    hub = {"hub_id": SD15_REPO, "used_by": "vd invert, vd edit (default model)"}
    if explicit:
        p = Path(str(explicit)).expanduser()
        problem = "not found" if not p.exists() else (None if p.is_file() else sd15_folder_problem(p))
        return _component("sd15", problem is None, p, ENV_SD15 if not paths.get("sd15") else "argument",
                          f"{ENV_SD15}={p}: {problem}; {SD15_GET}", **hub)
    snap = catalog.hub_snapshot(SD15_REPO)
    problem = "not in the Hugging Face cache" if snap is None else sd15_folder_problem(snap)
    return _component("sd15", problem is None, snap if problem is None else None, "hf-cache", SD15_GET, **hub)


def _adapter_status(paths: dict[str, Any]) -> dict[str, Any]:
    explicit = paths.get("motion_adapter") or os.environ.get(ENV_MOTION_ADAPTER)
    hub = {"hub_id": ADAPTER_REPO, "url": V3_CKPT_URL, "used_by": "vd invert, vd edit (default model)"}
    if explicit:
        p = Path(str(explicit)).expanduser()
        ok = p.is_file() or adapter_folder_ok(p)
        return _component("motion_adapter", ok, p, ENV_MOTION_ADAPTER if not paths.get("motion_adapter")
                          else "argument", f"{ENV_MOTION_ADAPTER}={p} is not usable; {ADAPTER_GET}", **hub)
    snap = catalog.hub_snapshot(ADAPTER_REPO)
    ok = snap is not None and adapter_folder_ok(snap)
    return _component("motion_adapter", ok, snap if ok else None, "hf-cache", ADAPTER_GET, **hub)


def _sam2_status() -> list[dict[str, Any]]:
    from stages.models.sam2_track import SAM2_CHECKPOINTS, find_sam2_checkpoint, how_to_get

    out = []
    for name, ckpt in SAM2_CHECKPOINTS.items():
        found = find_sam2_checkpoint(name)
        out.append(_component(f"sam2-{name}", found is not None, found, "local", how_to_get(name),
                              hub_id=ckpt.hub_id, url=ckpt.url, used_by=f"vd mask --sam2 {name}"))
    return out


def _tokenizer_status() -> dict[str, Any]:
    from stages.models.tokenizer import bpe_path

    try:
        path, ok = bpe_path(), True
    except ModelMissingError:
        path, ok = None, False
    return _component("clip-bpe", ok, path, "open-clip-torch", "pip install open-clip-torch",
                      used_by="tokenizer of tiny and single-file models")


def models_status(**paths: Any) -> dict[str, Any]:
    """Which generation weights are present locally and how to get the missing ones.

    Returns {"components": [...], "specs": {spec: ready}, "env": {...}}; each component has name, present,
    path, source, get (how to obtain it when missing), and hub_id / url / used_by where they apply.
    paths: sd15=..., motion_adapter=... as for load_models.
    """
    sd15, adapter = _sd15_status(paths), _adapter_status(paths)
    from stages.models.detector import detector_status
    from stages.models.sparsectrl import sparsectrl_status

    comps = [sd15, adapter, _tokenizer_status(), *_sam2_status(), sparsectrl_status(), detector_status()]
    env: dict[str, Any] = {k: os.environ.get(k) for k in (ENV_SD15, ENV_MOTION_ADAPTER, ENV_SD15_CONFIG,
                                                           ENV_SAM2_DIR, *HF_ENV)}
    try:
        env["hf_cache"] = str(catalog.hub_cache())
    except ImportError:
        pass
    specs = {"tiny": comps[2]["present"], DEFAULT_SPEC: sd15["present"] and adapter["present"]}
    return {"components": comps, "specs": specs, "env": env}


def eval_status() -> list[dict[str, Any]]:
    """`vd models` components for the evaluation models (same keys as models_status's components)."""
    out = []
    for name, env, used_by in (("clip", ENV_CLIP, "vd eval --metrics clip"),
                               ("pickscore", ENV_PICKSCORE, "vd eval --metrics pickscore"),
                               ("lpips", ENV_LPIPS, "vd eval --metrics lpips")):
        extra: dict[str, Any] = {"used_by": used_by}
        hub = [f for f in TARGETS[name] if isinstance(f, HubFile)]
        if hub:
            extra["hub_id"] = hub[0].repo_id
        else:
            extra["url"] = [f.url for f in TARGETS[name] if isinstance(f, UrlFile)]
        if os.environ.get(env):
            path: Path | None = Path(os.environ[env]).expanduser()
            present, source = path.exists(), env
        else:
            path, source = catalog.locate(name), "hf-cache" if hub else "vd-cache"
            if name == "pickscore" and path is not None and catalog.locate("pickscore-processor") is None \
                    and not os.environ.get(ENV_PICKSCORE_PROCESSOR):
                path = None  # the model alone cannot score: its processor files are part of `--get pickscore`
            present = path is not None
        out.append({"name": name, "present": present, "path": str(path) if present else None, "source": source,
                    "get": None if present else f"vd models --get {name}, or set {env}", **extra})
    return out
