"""Stage `vd info`: what each stage left in a workspace, read defensively (any subset of stages), and which
results are stale: made from inputs that changed since (docs/concepts/freshness.md; each stage's own rule)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.io.workspace import Workspace
from stages.common.errors import first_line

STAGE_DIRS = ("video", "masks", "inversion", "edits", "eval")


def run_info(path: str | Path, stale: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Summarise workspace `path` as a JSON-friendly dict (missing parts are simply absent/None); `stale`:
    its staleness(ws) when the caller has it already (it reads and hashes the arrays)."""
    ws = Workspace.open(path)
    attrs = ws.attrs
    source = attrs.get("source") or {}
    stale = staleness(ws) if stale is None else stale
    result: dict[str, Any] = {
        "workspace": str(ws.path.resolve()),
        "schema": attrs.get("schema"),
        "vd_version": attrs.get("vd_version"),
        "created": attrs.get("created"),
        "source": {k: source.get(k) for k in ("path", "sha256", "fps", "fps_out", "frames", "size", "start",
                                               "stride", "fps_sample", "sample", "resize", "indices")
                   if k in source},
        "geometry": geometry_of(source),
        "video": _video(ws),
        "masks": _masks(ws),
        "inversion": _inversion(ws),
        "edits": _edits(ws),
        "eval": _eval(ws),
    }
    _mark_stale(result, stale)
    sizes = {name: ws.size_bytes(name) for name in STAGE_DIRS if (ws.path / name).exists()}
    sizes["total"] = ws.size_bytes()
    result["sizes"] = sizes
    return result


def geometry_of(source: dict[str, Any]) -> dict[str, Any] | None:
    """How the workspace sits on its source (what `vd export` inverts): source and workspace size, resize
    mode, scale, the source box the workspace covers (crop) or where the picture sits in it (pad), and the
    span of source frames. None for a workspace that records no source size."""
    from stages.export.run import fit

    try:
        src = tuple(int(v) for v in source["source_size"])
        size = tuple(int(v) for v in source["size"])
        geom = fit(src, size, str(source.get("resize") or "crop"))  # type: ignore[arg-type]
    except Exception:  # an old or hand-made workspace: nothing to show
        return None
    out = geom.describe()
    if geom.mode == "pad":
        (oy, ox), (sh, sw) = geom.offset, geom.scaled
        out["pad_box"] = {"x": ox, "y": oy, "width": sw, "height": sh}
    out["span"] = _span(source)
    return out


def _span(source: dict[str, Any]) -> dict[str, Any] | None:
    """First and last source frame, stride and count (`indices` when recorded, else start and stride)."""
    indices = source.get("indices")
    frames = source.get("frames")
    start, stride = int(source.get("start") or 0), int(source.get("stride") or 1)
    if isinstance(indices, list) and indices:
        steps = {b - a for a, b in zip(indices, indices[1:])}
        step = steps.pop() if len(steps) == 1 else None
        return {"start": int(indices[0]), "end": int(indices[-1]), "stride": step if len(indices) > 1 else stride,
                "frames": len(indices), "fps_sample": source.get("fps_sample")}
    if not isinstance(frames, int):
        return None
    return {"start": start, "end": start + (frames - 1) * stride, "stride": stride, "frames": frames,
            "fps_sample": source.get("fps_sample")}


def _safe(fn: Any) -> Any:
    def wrapped(ws: Workspace) -> Any:
        try:
            return fn(ws)
        except Exception as exc:  # a damaged part must not hide the rest
            return {"error": f"{type(exc).__name__}: {first_line(str(exc))}"}
    return wrapped


@_safe
def _video(ws: Workspace) -> dict[str, Any] | None:
    if not ws.has("video/frames"):
        return None
    arr = ws.array("video/frames")
    return {"shape": list(arr.shape), "dtype": str(arr.dtype)}


@_safe
def _masks(ws: Workspace) -> dict[str, Any] | None:
    if not ws.has("masks"):
        return None
    attrs = ws.group_attrs("masks")
    out: dict[str, Any] = {"method": attrs.get("method"), "ellipse": attrs.get("ellipse"),
                           "arrays": [n for n in ("raw", "edit") if ws.has(f"masks/{n}")]}
    for name in ("raw", "edit"):
        coverage = attrs.get(f"coverage_{name}")
        if coverage is None and ws.has(f"masks/{name}"):
            coverage = [round(float(m.mean()), 5) for m in ws.read(f"masks/{name}")]
        if coverage is not None:
            out[f"coverage_{name}"] = coverage
            out[f"coverage_{name}_mean"] = round(float(np.mean(coverage)), 5) if coverage else 0.0
    for key in ("sam2", "points", "box", "prompt_frame", "mask_dir", "mask_video", "empty_frames"):
        if attrs.get(key) not in (None, [], ""):
            out[key] = attrs[key]
    preview = ws.file_path("masks/preview.gif")
    out["preview"] = str(preview.resolve()) if preview.is_file() else None
    objects = _objects(ws)
    if objects is not None:
        out["objects"], out["overlap_pixels"] = objects
    return out


def _objects(ws: Workspace) -> tuple[list[dict[str, Any]], dict[str, int]] | None:
    """The named objects (masks/objects): name, phrase and coverage each, and the overlaps resolved."""
    if not ws.has("masks/objects"):
        return None
    attrs = ws.group_attrs("masks/objects")
    names = attrs.get("names") or []
    phrases, coverage = attrs.get("phrases") or {}, attrs.get("coverage") or {}
    listed = []
    for name in names:
        cover = coverage.get(name)
        if cover is None and ws.has(f"masks/objects/{name}/raw"):
            cover = round(float(ws.read(f"masks/objects/{name}/raw").mean()), 5)
        listed.append({"name": name, "phrase": phrases.get(name), "coverage": cover})
    return listed, dict(attrs.get("overlap_pixels") or {})


@_safe
def _inversion(ws: Workspace) -> dict[str, Any] | None:
    if not ws.has("inversion"):
        return None
    attrs = ws.group_attrs("inversion")
    model = attrs.get("model")
    out: dict[str, Any] = {
        "status": attrs.get("status"),
        "method": attrs.get("method") or "null-text",  # inversions made before --method are null-text ones
        "prompt": attrs.get("prompt"),
        "subject": attrs.get("subject"),
        "model": model.get("spec") if isinstance(model, dict) else model,
        "schedule": attrs.get("schedule"),
        "config_hash": attrs.get("config_hash"),
    }
    total = attrs.get("steps")
    if not isinstance(total, int) and isinstance(attrs.get("timesteps"), list):
        total = len(attrs["timesteps"])
    if ws.has("inversion/done"):
        # `done` may carry one flag more than there are steps (vd invert marks the final report with it)
        done = np.asarray(ws.read("inversion/done")).astype(bool)
        total = total if isinstance(total, int) and 0 < total <= done.size else int(done.size)
        out["steps_done"] = int(done[:total].sum())
    if isinstance(total, int):
        out["steps_total"] = total
        out.setdefault("steps_done", 0)  # interrupted before the first step was committed
    for key in ("timings", "counts", "recon", "metrics"):
        if attrs.get(key) is not None:
            out[key] = attrs[key]
    out["arrays"] = sorted(_arrays_under(ws, "inversion"))
    out["writer"] = _writer(ws, "inversion")
    return {k: v for k, v in out.items() if v is not None}


@_safe
def _edits(ws: Workspace) -> list[dict[str, Any]] | None:
    root = ws.path / "edits"
    if not root.is_dir():
        return None
    edits = []
    for child in sorted(p for p in root.iterdir() if (p / "zarr.json").is_file()):
        attrs = ws.group_attrs(f"edits/{child.name}")
        entry = {"name": child.name, "prompt": attrs.get("prompt"), "resolved_prompt": attrs.get("resolved_prompt"),
                 "status": attrs.get("status"), "frames": ws.has(f"edits/{child.name}/frames"),
                 "mp4": str(child / "edit.mp4") if (child / "edit.mp4").is_file() else None}
        if attrs.get("timings") is not None:
            entry["timings"] = attrs["timings"]
        entry["writer"] = _writer(ws, f"edits/{child.name}")
        edits.append({k: v for k, v in entry.items() if v is not None})
    return edits


@_safe
def _eval(ws: Workspace) -> list[dict[str, Any]] | None:
    root = ws.path / "eval"
    if not root.is_dir():
        return None
    return [{"name": child.name, "metrics": ws.group_attrs(f"eval/{child.name}").get("metrics")}
            for child in sorted(p for p in root.iterdir() if (p / "zarr.json").is_file())]


def staleness(ws: Workspace) -> dict[str, tuple[str, str]]:
    """{"inversion" | "edits/<name>" | "eval/<name>": (why, fix)} of every stored result whose inputs changed
    since it was made, by each stage's own rule. A part that cannot be read is left to --check."""
    from stages.edit.fresh import stale_fix, stale_reason
    from stages.io.workspace import edit_names
    from stages.invert.store import inputs_changed, stale_fix as invert_fix
    from stages.io.reads import Reads

    reads, found = Reads(ws), {}
    try:
        inv = ws.group_attrs("inversion")
        why = inputs_changed(ws, inv, reads) if inv.get("settings") and inv.get("status") == "done" else ""
        if why:
            found["inversion"] = (why, invert_fix(ws))
        for name in edit_names(ws):
            if ws.group_attrs(f"edits/{name}").get("status") == "done":
                why = stale_reason(ws, name, reads, inv)
                if why:
                    found[f"edits/{name}"] = (why, stale_fix(ws, name))
        found.update(_stale_scores(ws, found))
    except Exception:  # a damaged part must not hide the rest (--check names it)
        pass
    return found


def _stale_scores(ws: Workspace, stale: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Stored scores (eval/<name>) of an item that is stale, or whose frames, masks or prompt changed."""
    from stages.evaluate import RECON
    from stages.evaluate.fresh import item_fingerprint
    from stages.evaluate.inputs import SourceClip

    root = ws.path / "eval"
    names = sorted(p.name for p in root.iterdir() if (p / "zarr.json").is_file()) if root.is_dir() else []
    names = [n for n in names if (ws.group_attrs(f"eval/{n}").get("settings") or {}).get("fingerprint")]
    if not names:
        return {}
    clip, found = SourceClip(ws), {}
    for name in names:
        item = "inversion" if name == RECON else f"edits/{name}"
        fix = f"rerun `vd eval {ws.path}`"
        if item in stale:
            found[f"eval/{name}"] = (f"it scored a stale {'inversion' if name == RECON else 'edit'}",
                                     f"{stale[item][1]}, then {fix}")
            continue
        frames = "inversion/reconstruction" if name == RECON else f"edits/{name}/frames"
        if not ws.has(frames):
            found[f"eval/{name}"] = ("what it scored is gone", fix)
            continue
        attrs = {} if name == RECON else ws.group_attrs(f"edits/{name}")
        scored = ws.group_attrs(f"eval/{name}")["settings"]["fingerprint"]
        if item_fingerprint(clip, clip.frames(name), attrs) != scored:
            found[f"eval/{name}"] = ("the frames, masks or prompt it scored changed", fix)
    return found


def _mark_stale(result: dict[str, Any], stale: dict[str, tuple[str, str]]) -> None:
    """Add `stale` (why) to the inversion, edit and eval entries of run_info's result."""
    inv = result.get("inversion")
    if isinstance(inv, dict) and "inversion" in stale:
        inv["stale"] = stale["inversion"][0]
    for kind in ("edits", "eval"):
        entries = result.get(kind)
        for entry in entries if isinstance(entries, list) else []:
            why = stale.get(f"{kind}/{entry.get('name')}")
            if why:
                entry["stale"] = why[0]


def _writer(ws: Workspace, name: str) -> str | None:
    """Who is writing stage `name` right now (a live lock holder), for `vd info`."""
    from stages.io import locks as stagelock

    info = stagelock.holder(ws.path, name)
    return stagelock.describe(info) if info else None


def _arrays_under(ws: Workspace, name: str) -> list[str]:
    """Names of arrays below group `name` (found through their zarr.json node type; .tmp/ and .locks/
    are not part of the workspace)."""
    import json

    found = []
    for meta in (ws.path / name).rglob("zarr.json"):
        if any(part.startswith(".") for part in meta.relative_to(ws.path).parts):
            continue
        try:
            node = json.loads(meta.read_text()).get("node_type")
        except (OSError, ValueError):
            continue
        if node == "array":
            found.append(str(meta.parent.relative_to(ws.path)))
    return found


def human_size(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_info(info: dict[str, Any]) -> list[str]:
    """Human-readable lines for `vd info`."""
    lines = [f"workspace  {info['workspace']}  ({info.get('schema')}, vd {info.get('vd_version')})"]
    src = info.get("source") or {}
    if src:
        size = src.get("size") or ["?", "?"]
        fps_out = src.get("fps_out")
        lines.append(f"source     {src.get('path', '?')}  sha256 {str(src.get('sha256', '?'))[:12]}")
        lines.append(f"frames     {src.get('frames', '?')} x {size[1]}x{size[0]} ({src.get('resize', '?')}), "
                     f"indices {_short_list(src.get('indices'))}, "
                     f"fps {_num(src.get('fps'))} -> {_num(fps_out)}")
    lines += _geometry_lines(info.get("geometry"))
    video = info.get("video")
    lines.append(f"video      {'missing' if not video else video.get('error') or video.get('shape')}")
    masks = info.get("masks")
    if masks is None:
        lines.append("masks      none (run `vd mask`)")
    elif "error" in masks:
        lines.append(f"masks      unreadable: {masks['error']}")
    else:
        lines.append(f"masks      {masks.get('method')}, ellipse {'on' if masks.get('ellipse') else 'off'}, "
                     f"coverage raw {_pct(masks.get('coverage_raw_mean'))} edit {_pct(masks.get('coverage_edit_mean'))}"
                     + (f", preview {masks['preview']}" if masks.get("preview") else ""))
        if masks.get("objects"):
            lines.append("objects    " + ", ".join(_object_text(o) for o in masks["objects"]))
            overlaps = {k: v for k, v in (masks.get("overlap_pixels") or {}).items() if v}
            if overlaps:
                lines.append("overlaps   " + ", ".join(f"{k} {v} px" for k, v in overlaps.items())
                             + " (resolved: each pixel to the object with the higher SAM2 score)")
    inv = info.get("inversion")
    if inv is None:
        lines.append("inversion  none (run `vd invert`)")
    elif "error" in inv and len(inv) == 1:
        lines.append(f"inversion  unreadable: {inv['error']}")
    else:
        steps = f"{inv.get('steps_done', '?')}/{inv.get('steps_total', '?')} steps"
        if inv.get("writer"):
            steps += f" (being written by {inv['writer']})"
        recon = inv.get("recon") if isinstance(inv.get("recon"), dict) else {}
        psnr = f", reconstruction PSNR {_num(recon['psnr'])} dB" if isinstance(recon.get("psnr"), float) else ""
        stale = f", STALE ({inv['stale']})" if inv.get("stale") else ""
        lines.append(f"inversion  {inv.get('status', '?')}{stale}, {steps}, method {inv.get('method', '?')}, "
                     f"model {inv.get('model', '?')}, "
                     f"prompt {inv.get('prompt')!r}{psnr}")
    edits = info.get("edits")
    if isinstance(edits, list) and edits:
        for edit in edits:
            busy = f" (being written by {edit['writer']})" if edit.get("writer") else ""
            stale = f", STALE ({edit['stale']})" if edit.get("stale") else ""
            lines.append(f"edit       {edit.get('name')}: {edit.get('status', '?')}{busy}{stale}, "
                         f"prompt {edit.get('prompt')!r}")
    elif isinstance(edits, dict):
        lines.append(f"edits      unreadable: {edits.get('error')}")
    evals = info.get("eval")
    if isinstance(evals, list):
        for entry in evals:
            metrics = entry.get("metrics") or {}
            # metrics without weights are stored as {"available": false, ...}: list only the numbers here
            numbers = {k: v for k, v in metrics.items() if not isinstance(v, dict)} if isinstance(metrics, dict) else {}
            shown = ", ".join(f"{k} {_num(v)}" for k, v in list(numbers.items())[:6]) if numbers else metrics
            stale = f" (STALE: {entry['stale']})" if entry.get("stale") else ""
            lines.append(f"eval       {entry.get('name')}: {shown}{stale}")
    sizes = info.get("sizes") or {}
    lines.append("disk       " + ", ".join(f"{k} {human_size(v)}" for k, v in sizes.items()))
    return lines


def _geometry_lines(geom: dict[str, Any] | None) -> list[str]:
    """`vd info`'s geometry and span lines (see geometry_of)."""
    if not geom:
        return []
    (h, w), (H, W), mode = geom["source_size"], geom["size"], geom["mode"]
    ky, kx = geom["scale"]
    scale = f"{kx:.6g}" if kx == ky else f"{kx:.6g} x {ky:.6g} (x, y)"
    box = geom["box"]
    x1, y1 = box["x"] + box["width"], box["y"] + box["height"]
    line = f"geometry   source {w}x{h} -> workspace {W}x{H} ({mode}), scale {scale}, "
    if mode == "pad":
        pad = geom["pad_box"]
        line += (f"picture at x {pad['x']}..{pad['x'] + pad['width']}, y {pad['y']}..{pad['y'] + pad['height']} "
                 f"of the workspace (bars around it)")
    else:
        line += f"source box x {box['x']}..{x1}, y {box['y']}..{y1} ({box['width']}x{box['height']} px)"
    lines = [line]
    span = geom.get("span")
    if span:
        stride = f"stride {span['stride']}" if span.get("stride") else "irregular steps"
        if span.get("fps_sample"):
            stride += f", sampled at {_num(span['fps_sample'])} fps"
        lines.append(f"span       source frames {span['start']} .. {span['end']}, {stride} ({span['frames']} frames)")
    return lines


def _object_text(entry: dict[str, Any]) -> str:
    phrase = f" {entry['phrase']!r}" if entry.get("phrase") else ""
    return f"{entry.get('name')}{phrase} {_pct(entry.get('coverage'))}"


def _short_list(values: Any) -> str:
    if not isinstance(values, list):
        return "?"
    return str(values) if len(values) <= 8 else f"[{values[0]}, {values[1]}, ... {values[-1]}]"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "?"


# --------------------------------------------------------------------------------------------- --check
def check_workspace(path: str | Path, stale: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """`vd info --check`: decode every chunk of every array and check that the stages agree with their
    done flags and with each other's shapes. Returns {ok, arrays, problems: [{name, problem, fix}],
    notes: [...], stale: [...]}; a stage being written right now (a live lock) is reported, not judged.
    `stale`: staleness(ws) when the caller has it already."""
    from stages.io import locks as stagelock
    from stages.common.errors import InputError
    from stages.io.workspace import remedy

    ws = Workspace.open(path)
    problems: list[dict[str, str]] = []
    notes: list[str] = []

    def problem(name: str, text: str) -> None:
        problems.append({"name": name, "problem": text, "fix": remedy(name, ws.path)})

    arrays = sorted(_arrays_under(ws, ""))
    shapes: dict[str, tuple[int, ...]] = {}
    for name in arrays:
        try:
            shapes[name] = ws.verify(name)
        except InputError as exc:
            problem(name, f"does not decode: {getattr(exc, 'detail', exc)}")
    frames = shapes.get("video/frames")
    if frames is None and "video/frames" not in arrays:
        problem("video/frames", "missing")
    objects = [n for n in shapes if n.startswith("masks/objects/")]
    for name in ("masks/raw", "masks/edit", *objects):
        if frames and name in shapes and shapes[name] != frames[:3]:
            problem(name, f"shape {list(shapes[name])} does not match the frames {list(frames[:3])}")
    if ws.has("inversion"):
        writer = stagelock.holder(ws.path, "inversion")
        if writer:
            notes.append(f"inversion: being written by {stagelock.describe(writer)}; not checked")
        else:
            _check_inversion(ws, shapes, frames, problem, notes)
    for name in sorted(p.name for p in (ws.path / "edits").glob("*") if (p / "zarr.json").is_file()):
        base = f"edits/{name}"
        writer = stagelock.holder(ws.path, base)
        status = ws.group_attrs(base).get("status")
        if writer:
            notes.append(f"{base}: being written by {stagelock.describe(writer)}; not checked")
        elif status != "done":
            notes.append(f"{base}: unfinished (status {status!r}); redo it with `vd edit {ws.path} --name {name} "
                         f"--force ...`")
        elif f"{base}/frames" not in arrays:
            problem(f"{base}/frames", "marked done but missing")
        elif frames and f"{base}/frames" in shapes and shapes[f"{base}/frames"] != frames:
            problem(f"{base}/frames", f"shape {list(shapes[f'{base}/frames'])} does not match the frames "
                                      f"{list(frames)}")
    busy = {n.split(":")[0] for n in notes if "being written" in n}
    stale = [{"name": name, "why": why, "fix": fix}
             for name, (why, fix) in (staleness(ws) if stale is None else stale).items()
             if name not in busy and not any(p["name"].startswith(name) for p in problems)]
    return {"workspace": str(ws.path.resolve()), "ok": not problems, "arrays": len(arrays),
            "problems": problems, "notes": notes, "stale": stale}


def _check_inversion(ws: Workspace, shapes: dict[str, tuple[int, ...]], frames: tuple[int, ...] | None,
                     problem: Any, notes: list[str]) -> None:
    attrs = ws.group_attrs("inversion")
    status, steps = attrs.get("status"), attrs.get("steps")
    if not isinstance(steps, int) or steps < 1:
        problem("inversion", f"its attributes give no step count (steps {steps!r})")
        return
    S = steps
    expect = {"inversion/latents": (S + 1,), "inversion/recon_latents": (S + 1,), "inversion/null_embeddings": (S,),
              "inversion/stdg/guidance": (S,), "inversion/done": (S + 1,)}
    if attrs.get("method") == "direct":
        expect["inversion/direct_offsets"] = (S,)
    for name, lead in expect.items():
        shape = shapes.get(name)
        if shape is None:
            continue
        if shape[:1] != lead or (frames and len(shape) > 1 and name != "inversion/done" and shape[1] != frames[0]):
            problem(name, f"shape {list(shape)} does not fit {S} steps of {frames[0] if frames else '?'} frames")
    done = None
    if "inversion/done" in shapes and shapes["inversion/done"] == (S + 1,):
        done = np.asarray(ws.read("inversion/done")).astype(bool)
    if status == "done":
        for name in [*expect, "inversion/reconstruction"]:
            if not ws.has(name):
                problem(name, "missing although the inversion is marked done")
        if done is not None and not done.all():
            problem("inversion/done", f"the inversion is marked done but only {int(done[:S].sum())} of {S} steps "
                                      f"are flagged")
    else:
        flagged = int(done[:S].sum()) if done is not None else 0
        notes.append(f"inversion: unfinished ({flagged}/{S} steps, status {status!r}); rerun `vd invert {ws.path}` "
                     f"to resume")
    if done is None:
        return
    # a flagged step must have its data: these arrays are never all zero, so a missing chunk is a lost one
    for name, index in (("inversion/null_embeddings", lambda i: i), ("inversion/recon_latents", lambda i: S - 1 - i)):
        if name not in shapes or not _slash_chunk_keys(ws, name):
            continue
        lost = [i for i in range(S) if done[i] and not (ws.path / name / "c" / str(index(i))).is_dir()]
        if lost:
            problem(name, f"chunks of flagged step(s) {lost[:8]} are missing")


def _slash_chunk_keys(ws: Workspace, name: str) -> bool:
    """Whether array `name` stores chunk (i, 0, ...) under c/i/... (zarr v3's default key encoding)."""
    import json

    try:
        enc = json.loads((ws.path / name / "zarr.json").read_text()).get("chunk_key_encoding") or {}
    except (OSError, ValueError):
        return False
    return enc.get("name") == "default" and (enc.get("configuration") or {}).get("separator", "/") == "/"


def format_check(check: dict[str, Any]) -> list[str]:
    """Human-readable lines for `vd info --check`."""
    stale = check.get("stale") or []
    lines = [f"check      {'ok' if check['ok'] else 'DAMAGED'}: {check['arrays']} arrays decoded"
             + (f", {len(check['problems'])} problem(s)" if check["problems"] else "")
             + (f", {len(stale)} stale result(s) (made from inputs that changed since)" if stale else "")]
    for item in check["problems"]:
        lines.append(f"  damaged  {item['name']}: {item['problem']}; fix: {item['fix']}")
    for item in stale:
        lines.append(f"  stale    {item['name']}: {item['why']}; fix: {item['fix']}")
    for note in check["notes"]:
        lines.append(f"  note     {note}")
    return lines
