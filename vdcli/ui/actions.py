"""Every action of the page, as plain Python (no Gradio): each builds the same config the CLI builds and calls
the same stage entry point (stages.mask.run_mask, stages.invert.run_invert / plan.plan_invert,
stages.edit.run_edits, stages.evaluate.run_eval, stages.export), and returns, with its results, the
equivalent `vd` command line, so what a person clicked can be scripted and the CLI continues from it.
"""

from __future__ import annotations

import dataclasses
import shlex
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.errors import InputError, UsageError
from vdcli.ui import objects as obj
from vdcli.ui.jobs import JobBoard, PageProgress, Report
from vdcli.ui.paths import Root

MAX_DRAFTS = 8  # clips opened but not tracked yet, kept in memory
FIRST_FRAME_BYTES = 64 * 2**20  # the largest first-frame image the page keeps


@dataclass
class Draft:
    """A clip opened on the page whose workspace `vd mask` (Track) has not written yet."""

    clip: Path
    selection: dict[str, Any]  # MaskConfig's frame options (frames, size, start, stride, fps, sample, resize)
    frames: np.ndarray


def command(*parts: Any) -> str:
    """A copyable shell command line (None parts left out)."""
    return shlex.join(str(p) for p in parts if p is not None)


def _flags(pairs: list[tuple[str, Any]]) -> list[str]:
    """['--flag', value, ...] for the pairs whose value is set (True: the bare flag)."""
    out: list[str] = []
    for flag, value in pairs:
        if value is None or value is False or value == "":
            continue
        out += [flag] if value is True else [flag, str(value)]
    return out


def selection_of(source: dict[str, Any]) -> dict[str, Any]:
    """MaskConfig's frame options that reproduce a workspace's frame selection (its source attrs)."""
    height, width = source["size"]
    sample = source.get("sample") or "stride"
    fps = source.get("fps_sample")
    return {"frames": int(source["frames"]), "size": f"{width}x{height}" if width != height else str(width),
            "start": int(source.get("start") or 0),
            "stride": None if (fps or sample == "uniform") else source.get("stride"), "fps": fps,
            "sample": sample, "resize": source.get("resize") or "crop"}


def selection_flags(selection: dict[str, Any]) -> list[str]:
    """The `vd mask` flags of a frame selection."""
    frames = "all" if selection["frames"] == 0 else selection["frames"]
    return _flags([("--frames", frames), ("--size", selection["size"]), ("--start", selection["start"] or None),
                   ("--stride", selection["stride"] if selection["stride"] not in (None, 1) else None),
                   ("--fps", selection.get("fps")),
                   ("--sample", selection["sample"] if selection["sample"] != "stride" else None),
                   ("--resize", selection["resize"] if selection["resize"] != "crop" else None)])


class Studio:
    """The page's actions over one ROOT. Models are loaded once and kept (one at a time) across actions."""

    def __init__(self, root: str | Path, model: str | None = None, device: str = "auto", sam2: str = "auto",
                 board: JobBoard | None = None, scratch: str | Path | None = None):
        self.root = Root(root)
        self.model, self.device, self.sam2 = model, device, sam2
        self.board = board or JobBoard()
        self.drafts: dict[str, Draft] = {}
        self._models: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()
        # videos made for the page only (side by side): Gradio serves them from the system temp folder
        self.scratch = Path(scratch or tempfile.mkdtemp(prefix="vd-ui-"))

    # ------------------------------------------------------------------ workspace state
    def _workspace(self, workspace: str | Path) -> Any:
        from stages.io.workspace import Workspace

        return Workspace.open(self.root.inside(workspace, "workspace"))

    def info(self, workspace: str | Path) -> str:
        """What `vd info WS` prints for the workspace (or the draft's clip when not written yet)."""
        from stages.info import format_info, run_info

        path = self.root.inside(workspace, "workspace")
        if str(path) in self.drafts and not (path / "zarr.json").is_file():
            draft = self.drafts[str(path)]
            f, h, w = draft.frames.shape[:3]
            return (f"clip {self.root.show(draft.clip)}: {f} frames of {w}x{h}; the workspace "
                    f"{self.root.show(path)} is written by Track (vd mask)")
        return "\n".join(format_info(run_info(path)))

    def frames(self, workspace: str | Path) -> Any:
        """The workspace's frames (uint8 F, H, W, 3; a zarr array, read lazily): the draft's until Track wrote
        them."""
        path = self.root.inside(workspace, "workspace")
        draft = self.drafts.get(str(path))
        if draft is not None:
            return draft.frames
        ws = self._workspace(path)
        if not ws.has("video/frames"):
            raise InputError(f"workspace {self.root.show(path)} has no frames; open its clip")
        return ws.array("video/frames")

    def frame(self, workspace: str | Path, index: int, objects: Any = None,
              corner: list[float] | None = None) -> np.ndarray:
        """Frame `index` with the objects' points and boxes drawn in their colours."""
        frames = self.frames(workspace)
        index = int(min(max(int(index or 0), 0), frames.shape[0] - 1))
        return obj.draw(np.asarray(frames[index]), obj.parse_objects(objects), corner)

    # ------------------------------------------------------------------ Clip
    def open_clip(self, clip: str, frames: str | int = "16", size: str = "512", start: int = 0,
                  stride: int | None = None, resize: str = "crop", workspace: str | None = None) -> dict[str, Any]:
        """Decode and select the clip's frames as `vd mask` will (nothing is written until Track)."""
        from stages.common.config import build_config, options
        from stages.io import video as vid
        from stages.mask.run import MaskConfig, check_options, parse_frames

        path = self.root.inside(clip, "clip")
        if not path.exists():
            raise InputError(f"clip {self.root.show(path)} not found under {self.root.path}")
        stride = int(stride) if stride not in (None, "", 0) else None
        cfg = build_config(MaskConfig, options(dict(frames=parse_frames(str(frames).strip()), size=str(size).strip(),
                                                    start=int(start or 0), stride=stride, resize=resize)))
        check_options(dataclasses.replace(cfg, box="0,0,1,1"))  # the frame options, checked as vd mask does
        loaded = vid.load_clip(path, cfg.frames, vid.parse_size(cfg.size), cfg.start, cfg.stride, cfg.fps,
                               cfg.sample, cfg.resize)
        stem = path.name if path.is_dir() else path.stem
        target = self.root.inside(workspace or f"{stem or 'clip'}.vd", "workspace")
        selection = {k: getattr(cfg, k) for k in ("frames", "size", "start", "stride", "fps", "sample", "resize")}
        described = None
        if (target / "zarr.json").is_file():
            ws = self._workspace(target)
            old = ws.attrs.get("source") or {}
            same = old.get("sha256") == loaded.source["sha256"] and all(
                old.get(k) == loaded.source.get(k) for k in ("frames", "size", "start", "stride", "fps_sample",
                                                             "resize"))
            if not same:
                raise InputError(f"workspace {self.root.show(target)} was made from another clip or frame "
                                 f"selection; open it as a workspace, or name another workspace")
            described = ws.group_attrs("masks").get("objects")
        self.drafts.pop(str(target), None)
        while len(self.drafts) >= MAX_DRAFTS:
            self.drafts.pop(next(iter(self.drafts)))
        self.drafts[str(target)] = Draft(path, selection, loaded.frames)
        return self._opened(target, loaded.frames, described,
                            command("vd", "mask", path, "-o", target, *selection_flags(selection), "..."))

    def open_workspace(self, workspace: str) -> dict[str, Any]:
        """Open a workspace made by the page or by `vd mask`."""
        ws = self._workspace(workspace)
        self.drafts.pop(str(ws.path.resolve()), None)
        if not ws.has("video/frames"):
            raise InputError(f"workspace {self.root.show(ws.path)} has no frames")
        return self._opened(ws.path.resolve(), ws.array("video/frames"), ws.group_attrs("masks").get("objects"),
                            command("vd", "info", ws.path.resolve()))

    def _opened(self, target: Path, frames: Any, described: Any, line: str) -> dict[str, Any]:
        preview = target / "masks" / "preview.gif"
        return {"workspace": str(target), "frames": int(frames.shape[0]), "size": list(frames.shape[1:3]),
                "objects": obj.from_workspace(described), "preview": str(preview) if preview.is_file() else None,
                "info": self.info(target), "command": line, "defaults": self.defaults(target)}

    def defaults(self, workspace: str | Path) -> dict[str, Any]:
        """Field values from what the workspace stores: the inversion's settings, objects, finished edits."""
        from stages.io.workspace import edit_finished, edit_names
        from stages.io.workspace import Workspace

        path = self.root.inside(workspace, "workspace")
        if not (path / "zarr.json").is_file():
            return {"inversion": {}, "objects": [], "edits": []}
        ws = Workspace.open(path)
        inv = ws.group_attrs("inversion")
        config = inv.get("config") or {}
        names = ws.group_attrs("masks/objects").get("names") or []
        phrases = ws.group_attrs("masks/objects").get("phrases") or {}
        return {"inversion": {"prompt": inv.get("prompt"), "subject": inv.get("subject"),
                              "method": inv.get("method") or config.get("method"), "steps": config.get("steps"),
                              "null_steps": config.get("null_steps"), "status": inv.get("status")},
                "objects": [[n, phrases.get(n) or ""] for n in names],
                "edits": [n for n in edit_names(ws) if edit_finished(ws, n)]}

    def invert_defaults(self) -> dict[str, Any]:
        """The invert fields' defaults: InvertConfig under the default preset (what `vd invert` starts from)."""
        from stages.common.config import build_config, preset_section
        from stages.invert import InvertConfig

        cfg = build_config(InvertConfig, preset_section(None, "invert"))
        return {"method": cfg.method, "steps": int(cfg.steps), "null_steps": int(cfg.null_steps)}

    def save_upload(self, uploaded: str, max_bytes: int) -> str:
        """Keep an uploaded clip under ROOT/uploads/; returns its path relative to ROOT."""
        return self.root.show(self.root.save_upload(uploaded, max_bytes))

    # ------------------------------------------------------------------ Objects
    def sam2_state(self) -> tuple[bool, str]:
        """(usable, one line): whether Track can run SAM2 here, said plainly."""
        from stages.models import sam2_track

        name = sam2_track.canonical_name(self.sam2)
        if name == sam2_track.RANDOM:
            return True, ("SAM2 runs with RANDOM weights (vd ui --sam2 random, for tests): its masks mean "
                          "nothing; tick box only for a usable mask")
        found = sam2_track.find_sam2_checkpoint(name)
        if found is None:
            return False, (f"No SAM2 weights found, so Track cannot follow the object: tick box only (one object, "
                           f"its box on every frame), or get the weights: {sam2_track.how_to_get()}")
        return True, f"SAM2 weights: {found}"

    def track(self, workspace: str, objects: Any, box_only: bool = False, prompt_frame: int = 0,
              ellipse: bool = True, report: Report | None = None) -> dict[str, Any]:
        """`vd mask`: write the workspace's frames and the objects' masks; returns the preview and command."""
        from stages.common.config import build_config, options
        from stages.io.workspace import Workspace
        from stages.mask.run import MaskConfig, run_mask

        target = self.root.inside(workspace, "workspace")
        draft = self.drafts.get(str(target))
        if draft is not None:
            clip, selection = draft.clip, draft.selection
        else:
            source = Workspace.open(target).attrs.get("source") or {}
            if not source.get("path"):
                raise InputError(f"workspace {self.root.show(target)} records no clip; open the clip instead")
            clip, selection = self.root.inside(source["path"], "the workspace's clip"), selection_of(source)
        fields, object_flags, note = obj.mask_options(obj.parse_objects(objects), bool(box_only))
        run_flags = {"prompt_frame": int(prompt_frame or 0), "ellipse": bool(ellipse), "device": self.device}
        if not box_only:
            run_flags["sam2"] = self.sam2
        cfg = build_config(MaskConfig, options({**selection, **fields, **run_flags}))
        with self.board.run("track", self.root.show(target)) as job:
            result = run_mask(clip, target, cfg, PageProgress(job, report))
        self.drafts.pop(str(target), None)
        line = command("vd", "mask", clip, "-o", target, *selection_flags(selection), *object_flags,
                       *_flags([("--prompt-frame", cfg.prompt_frame or None), ("--no-ellipse", not cfg.ellipse),
                                ("--sam2", None if box_only or cfg.sam2 == "auto" else cfg.sam2),
                                ("--device", None if cfg.device == "auto" else cfg.device)]))
        return {"preview": result["preview"], "result": result, "command": line, "note": note,
                "info": self.info(target)}

    # ------------------------------------------------------------------ Invert
    def _invert_config(self, ws: Any, prompt: str | None, subject: str | None, method: str | None,
                       steps: int | None, null_steps: int | None, checkpointing: str | None) -> tuple[Any, list[str]]:
        """InvertConfig exactly as `vd invert` resolves it (stored settings, default preset, flags)."""
        from stages.common.config import options, preset_section
        from stages.invert import resolve_config

        prompt = (prompt or "").strip() or None
        subject = (subject or "").strip() or None
        flags = {"prompt": prompt, "subject": subject, "method": method or None, "model": self.model,
                 "steps": int(steps) if steps not in (None, "") else None,
                 "null_steps": int(null_steps) if null_steps not in (None, "") else None,
                 "checkpointing": checkpointing or None, "device": self.device}
        cfg = resolve_config(ws, preset_section(None, "invert"), options(flags))
        argv = _flags([("--prompt", prompt), ("--subject", subject), ("--method", flags["method"]),
                       ("--model", self.model), ("--steps", flags["steps"]), ("--null-steps", flags["null_steps"]),
                       ("--checkpointing", flags["checkpointing"]),
                       ("--device", None if self.device == "auto" else self.device)])
        return cfg, argv

    def estimate(self, workspace: str, prompt: str | None = None, subject: str | None = None,
                 method: str | None = None, steps: int | None = None, null_steps: int | None = None,
                 checkpointing: str | None = None) -> dict[str, Any]:
        """`vd invert --dry-run`: predicted memory and time; loads no weights, writes nothing."""
        from stages.invert.plan import format_plan, plan_invert

        ws = self._workspace(workspace)
        cfg, argv = self._invert_config(ws, prompt, subject, method, steps, null_steps, checkpointing)
        plan = plan_invert(ws, cfg)
        return {"plan": plan, "text": format_plan(plan),
                "command": command("vd", "invert", ws.path.resolve(), *argv, "--dry-run")}

    def models_for(self, spec: str, dtype: str = "auto", per_frame_groupnorm: bool = True) -> Any:
        """The loaded model for `spec` (kept for the next action; loading another one drops it)."""
        from stages.models.load import load_models

        key = (spec, self.device, dtype, bool(per_frame_groupnorm))
        with self._lock:
            if key not in self._models:
                self._models.clear()
                self._models[key] = load_models(spec, device=self.device, dtype=dtype,
                                                per_frame_groupnorm=per_frame_groupnorm)
            return self._models[key]

    def invert(self, workspace: str, prompt: str | None = None, subject: str | None = None,
               method: str | None = None, steps: int | None = None, null_steps: int | None = None,
               checkpointing: str | None = None, report: Report | None = None) -> dict[str, Any]:
        """`vd invert`: run (or resume) the inversion; returns its summary, reconstruction video and command."""
        from stages.invert import is_current, run_invert

        ws = self._workspace(workspace)
        cfg, argv = self._invert_config(ws, prompt, subject, method, steps, null_steps, checkpointing)
        with self.board.run("invert", self.root.show(ws.path)) as job:
            progress = PageProgress(job, report)
            fresh, _ = is_current(ws, cfg)
            if not fresh:
                progress.log(f"loading model {cfg.model} ...")
            models = None if fresh else self.models_for(cfg.model, cfg.dtype, cfg.per_frame_groupnorm)
            result = run_invert(ws, cfg, progress, models=models)
        return {"result": result, "summary": invert_summary(result),
                "video": (result.get("outputs") or {}).get("reconstruction.mp4"),
                "command": command("vd", "invert", ws.path.resolve(), *argv), "info": self.info(ws.path)}

    # ------------------------------------------------------------------ Edit
    def edit(self, workspace: str, prompt: str | None = None, name: str | None = None,
             regions: dict[str, str] | None = None, first_frame: str | None = None,
             first_frame_scale: float | None = None, tau_s: float | None = None, tau_c: float | None = None,
             blend: str | None = None, force: bool = False, report: Report | None = None) -> dict[str, Any]:
        """`vd edit`: one edit (a prompt, or one target phrase per object); returns its video, a side-by-side
        video (source | edit) and the command. `first_frame`: an uploaded image (copied under ROOT/uploads/)."""
        from stages.common.config import build_config, options, preset_section
        from stages.edit.run import EditConfig, load_inversion_for_edit, run_edits

        ws = self._workspace(workspace)
        prompt = (prompt or "").strip() or None
        regions = {k.strip(): " ".join(v.split()) for k, v in (regions or {}).items() if v and v.strip()}
        if bool(prompt) + bool(regions) > 1 or (not prompt and not regions and not first_frame):
            raise UsageError("give a target prompt, or a target for one object or more (not both)")
        edit: dict[str, Any] = {"regions": regions} if regions else {"prompt": prompt} if prompt else {}
        name = (name or "").strip() or None
        blend_words = blend.replace(",", " ").split() if blend and blend.strip() else None
        if first_frame:  # kept under ROOT/uploads/ so the command line stays valid after the page closes
            first_frame = str(self.root.save_upload(first_frame, FIRST_FRAME_BYTES, kind="image"))
        flags = {"name": name, "tau_s": tau_s, "tau_c": tau_c, "blend": blend_words, "force": bool(force) or None,
                 "device": self.device,
                 "first_frame": first_frame,
                 "first_frame_scale": first_frame_scale if first_frame else None}
        cfg = build_config(EditConfig, preset_section(None, "edit"), options(flags), options(edit))
        argv = _flags([("--prompt", prompt)])
        for key, value in regions.items():
            argv += ["--region", f"{key}={value}"]
        argv += _flags([("--name", name), ("--tau-s", tau_s), ("--tau-c", tau_c),
                        ("--blend", " ".join(blend_words) if blend_words else None),
                        ("--first-frame", flags["first_frame"]), ("--first-frame-scale", flags["first_frame_scale"]),
                        ("--force", bool(force)), ("--device", None if self.device == "auto" else self.device)])
        with self.board.run("edit", self.root.show(ws.path)) as job:
            progress = PageProgress(job, report)
            inv = load_inversion_for_edit(ws)
            pfg = (inv.attrs.get("config") or {}).get("per_frame_groupnorm", True)
            progress.log(f"loading model {inv.model.get('spec')} ...")
            models = self.models_for(inv.model.get("spec", "sd15-animatediff-v3"), cfg.dtype, pfg)
            result = run_edits(ws, [cfg], progress, models=models)[0]
        return {"result": result, "name": result["name"], "video": result["outputs"]["mp4"],
                "side_by_side": self.side_by_side(ws.path, result["name"]),
                "command": command("vd", "edit", ws.path.resolve(), *argv), "info": self.info(ws.path)}

    def side_by_side(self, workspace: str | Path, name: str) -> str:
        """An mp4 of source | edit for the page's player (in the page's scratch folder, not the workspace)."""
        from stages.io import video as vid

        ws = self._workspace(workspace)
        fps = float((ws.attrs.get("source") or {}).get("fps_out") or 8.0)
        both = vid.side_by_side(np.asarray(ws.read("video/frames")), np.asarray(ws.read(f"edits/{name}/frames")),
                                labels=["source", name])
        return str(vid.write_mp4(self.scratch / f"{name}-{uuid.uuid4().hex[:8]}.mp4", both, fps))

    def evaluate(self, workspace: str, name: str, report: Report | None = None) -> dict[str, Any]:
        """`vd eval WS --edit NAME`: score the edit; returns rows (metric, value) and the command."""
        from stages.evaluate import EvalConfig, parse_metrics, run_eval
        from stages.io import locks as stagelock

        ws = self._workspace(workspace)
        config = EvalConfig(edits=[name], metrics=parse_metrics(None), device=self.device)
        with self.board.run("eval", self.root.show(ws.path)) as job, stagelock.scope():
            stagelock.hold(ws.path, stagelock.WORKSPACE, "vd ui", f"workspace {ws.path}", shared=True)
            result = run_eval(ws, config, PageProgress(job, report))
        return {"result": result, "rows": score_rows(result["items"].get(name, {}).get("metrics") or {}),
                "command": command("vd", "eval", ws.path.resolve(), "--edit", name)}

    # ------------------------------------------------------------------ Export
    def export(self, workspace: str, name: str | None = None, codec: str = "h264", crf: int | None = None,
               audio: str = "copy", whole_clip: bool = False, feather: int | None = None,
               color_match: bool = True, force: bool = False, report: Report | None = None) -> dict[str, Any]:
        """`vd export`: composite the edit into the source footage (stages.export.run_export) at the default
        output inside the workspace; returns the written file (or PNG folder) and the command."""
        from stages.common.config import build_config, options
        from stages.export.config import ExportConfig
        from stages.export.run import run_export

        ws = self._workspace(workspace)
        name = (name or "").strip() or None
        crf = int(crf) if crf not in (None, "") else None
        feather = int(feather) if feather not in (None, "") else None
        cfg = build_config(ExportConfig, options(dict(edit=name, codec=codec, crf=crf, audio=audio,
                                                      whole_clip=bool(whole_clip), feather=feather,
                                                      color_match=bool(color_match), force=bool(force))))
        with self.board.run("export", self.root.show(ws.path)) as job:
            result = run_export(ws, cfg, PageProgress(job, report))
        argv = _flags([("--edit", name), ("--codec", codec if codec != "h264" else None), ("--crf", crf),
                       ("--audio", audio if audio != "copy" else None), ("--whole-clip", bool(whole_clip)),
                       ("--feather", feather), ("--color-match", None if color_match else "off"),
                       ("--force", bool(force))])
        return {"path": str(Path(result["output"]).resolve()), "result": result,
                "command": command("vd", "export", ws.path.resolve(), *argv)}

    # ------------------------------------------------------------------ jobs
    def status(self) -> str:
        """The running job, or how the last one ended (what every tab's status line shows)."""
        return self.board.status()

    def stop(self) -> str:
        """Stop the running job at its next step (finished steps are kept)."""
        return self.board.stop()


def invert_summary(result: dict[str, Any]) -> str:
    """The inversion's result in a few lines (as `vd invert` prints it)."""
    recon = result.get("recon") or {}

    def db(key: str) -> str:
        value = recon.get(key)
        return f"{float(value):.2f} dB" if isinstance(value, (int, float)) else "n/a"

    lines = [f"inverted: {result.get('steps', '?')} steps, {result.get('frames', '?')} frames, method "
             f"{result.get('method') or 'null-text'}" + (" (already complete)" if result.get("already_done") else "")]
    if recon:
        lines.append(f"reconstruction PSNR {db('psnr')}"
                     + (f" (inside mask {db('psnr_fg')}, outside {db('psnr_bg')})" if "psnr_fg" in recon else "")
                     + f", VAE-only PSNR {db('vae_psnr')}")
    total = (result.get("timings") or {}).get("total_s")
    if total is not None and not result.get("already_done"):
        lines.append(f"time {float(total):.1f} s")
    return "\n".join(lines)


def score_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """[[metric, value]] for the page's table; unavailable metrics as 'n/a: reason'."""
    from vdcli.commands.eval import LABELS

    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            shown = f"n/a: {value.get('reason', 'unavailable')}"
        elif value is None:
            shown = "—"
        elif isinstance(value, (int, float)):
            shown = f"{value:.4g}"
        else:
            shown = str(value)
        rows.append([LABELS.get(key, key), shown])
    return rows
