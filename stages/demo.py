"""The demo: generate a clip, then run mask -> invert -> edit -> eval on it, loading the model once.

With the tiny model (default when real weights are absent) everything runs offline on a CPU in about a
minute; its output is noise that only proves the plumbing. With real weights it is a real edit.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.progress import Progress

PROMPT = "a red ball rolling across a patterned floor"
SUBJECT = "red ball"
EDIT = "blue cube"


@dataclass
class DemoConfig:
    """Demo settings; None picks the model-appropriate default."""

    model: str = "auto"  # auto: real weights when present, else tiny
    frames: int | None = None
    size: int | None = None
    steps: int | None = None
    null_steps: int | None = None
    device: str = "auto"


def choose_model(requested: str) -> str:
    """'auto' -> the real default spec when its weights are present locally, else 'tiny'."""
    if requested != "auto":
        return requested
    from stages.models.catalog import DEFAULT_SPEC
    from stages.models.status import models_status

    return DEFAULT_SPEC if models_status()["specs"].get(DEFAULT_SPEC) else "tiny"


def write_clip(folder: Path, frames: int, size: int) -> tuple[Path, Path]:
    """Write the generated clip (mp4) and its ground-truth masks (one PNG per frame)."""
    from PIL import Image

    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    video, masks = moving_disc(frames, size, size, seed=0)
    clip = write_mp4(folder / "clip.mp4", video, fps=8.0)
    mask_dir = folder / "clip_masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(masks):
        Image.fromarray(m * 255).save(mask_dir / f"{i:04d}.png")
    return Path(clip), mask_dir


def run_demo(folder: str | Path, cfg: DemoConfig, progress: Progress) -> dict[str, Any]:
    """Run the whole pipeline in `folder`; return paths, timings and the equivalent shell commands."""
    from stages.common.errors import Interrupted

    try:
        return _run_demo(Path(folder), cfg, progress)
    except (Interrupted, KeyboardInterrupt):
        # the stages' own advice ("rerun to resume") does not hold here: the demo always starts over
        raise Interrupted(f"demo interrupted; rerun the same `vd demo` command to start it over in {folder}") from None


def _run_demo(folder: Path, cfg: DemoConfig, progress: Progress) -> dict[str, Any]:
    from stages.common.config import build_config
    from stages.edit.run import EditConfig, run_edit
    from stages.evaluate import EvalConfig, run_eval
    from stages.invert import InvertConfig, run_invert
    from stages.mask.run import MaskConfig, run_mask
    from stages.models.load import load_models

    folder.mkdir(parents=True, exist_ok=True)
    model = choose_model(cfg.model)
    tiny = model == "tiny"
    frames = cfg.frames or (8 if tiny else 16)
    size = cfg.size or (128 if tiny else 512)
    steps = cfg.steps or (10 if tiny else 50)
    null_steps = cfg.null_steps or (3 if tiny else 10)
    if tiny:
        progress.log("demo: using the tiny random model (no real weights found): the edit is noise that "
                     "proves the plumbing; real edits need the real weights (see `vd models`)")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    clip, mask_dir = write_clip(folder, frames, size)
    ws_path = folder / "clip.vd"
    mask = run_mask(clip, ws_path, build_config(MaskConfig, {"frames": frames, "size": str(size),
                                                             "mask_dir": str(mask_dir), "force": True}), progress)
    timings["mask_s"] = time.perf_counter() - t0

    from stages.io.workspace import Workspace

    ws = Workspace.open(ws_path)
    t0 = time.perf_counter()
    models = load_models(model, device=cfg.device)
    timings["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inv_cfg = build_config(InvertConfig, {"prompt": PROMPT, "subject": SUBJECT, "model": model, "steps": steps,
                                          "null_steps": null_steps, "device": cfg.device, "restart": True})
    inversion = run_invert(ws, inv_cfg, progress, models=models)
    timings["invert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    edit = run_edit(ws, build_config(EditConfig, {"prompt": EDIT, "name": "blue", "force": True,
                                                  "device": cfg.device}), progress, models=models)
    timings["edit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluation = run_eval(ws, EvalConfig(), progress)
    timings["eval_s"] = time.perf_counter() - t0

    q = shlex.quote
    commands = [
        f"vd mask {q(str(clip))} -o {q(str(ws_path))} --frames {frames} --size {size} --mask-dir {q(str(mask_dir))} --force",
        f"vd invert {q(str(ws_path))} --prompt {q(PROMPT)} --subject {q(SUBJECT)} --model {model} "
        f"--steps {steps} --null-steps {null_steps}",
        f"vd edit {q(str(ws_path))} --prompt {q(EDIT)} --name blue --force",
        f"vd eval {q(str(ws_path))}",
    ]
    return {"workspace": str(ws_path), "model": model, "tiny": tiny, "clip": str(clip),
            "mask_preview": mask.get("preview"), "reconstruction": inversion.get("outputs", {}),
            "recon": inversion.get("recon"), "edit": edit.get("outputs", edit), "eval": evaluation.get("items"),
            "timings": timings, "commands": commands}
