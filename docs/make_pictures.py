"""Regenerate the pictures of the docs (docs/img/): run `vd demo` with the tiny model in a temporary
folder, then draw the source | mask | edit strip, copy the mask and edit previews; run mask -> invert ->
edit -> export on a generated 320x180 clip for the source | workspace edit | export strip; and chart the
predicted memory of each stage at 16 x 512x512 bf16 from the measured memory model.

    .venv/bin/python docs/make_pictures.py [--out docs/img]

The tiny model is random: its edit is noise, and every picture made from it says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.io.video import overlay_mask  # noqa: E402
from stages.io.workspace import Workspace  # noqa: E402
from stages.models.memory import GIB, LEVELS, predict_stage_peak  # noqa: E402


def labelled(image: np.ndarray, text: str) -> Image.Image:
    """The frame with a caption bar above it."""
    img = Image.fromarray(image)
    out = Image.new("RGB", (img.width, img.height + 16), "white")
    out.paste(img, (0, 16))
    ImageDraw.Draw(out).text((2, 2), text, fill="black", font=ImageFont.load_default())
    return out


def strip(ws: Workspace, edit: str) -> Image.Image:
    """Three frames (first, middle, last), each as source | mask overlay | edit."""
    frames = ws.read("video/frames")
    mask = ws.read("masks/edit")
    edited = ws.read(f"edits/{edit}/frames")
    overlay = overlay_mask(frames, mask, color=(40, 120, 255))
    picks = sorted({0, len(frames) // 2, len(frames) - 1})
    rows = []
    for f in picks:
        cells = [labelled(frames[f], f"source f{f}"), labelled(overlay[f], "mask"),
                 labelled(edited[f], "edit (tiny: noise)")]
        row = Image.new("RGB", (sum(c.width for c in cells) + 8, cells[0].height), "white")
        x = 0
        for c in cells:
            row.paste(c, (x, 0))
            x += c.width + 4
        rows.append(row)
    out = Image.new("RGB", (rows[0].width, sum(r.height for r in rows) + 4 * len(rows)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + 4
    return out


def export_strip(folder: Path, vd: Path) -> Image.Image:
    """Source (320x180) | the workspace's 128x128 edit | the export at the source's size, first frame,
    made by the real commands in separate processes with the tiny model."""
    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    video, mask = moving_disc(8, 180, 320, seed=3)
    clip = write_mp4(folder / "wide.mp4", video, 24.0)
    masks = folder / "wide_masks"
    masks.mkdir()
    for i, m in enumerate(mask):
        Image.fromarray((np.asarray(m) > 0).astype(np.uint8) * 255).save(masks / f"{i:05d}.png")
    ws = folder / "wide.vd"
    run = lambda *args: subprocess.run([str(vd), *map(str, args), "-q"], check=True, capture_output=True)  # noqa: E731
    run("mask", clip, "-o", ws, "--frames", 8, "--size", 128, "--mask-dir", masks)
    run("invert", ws, "--prompt", "a red ball rolling across a patterned floor", "--subject", "red ball",
        "--model", "tiny", "--steps", 6, "--null-steps", 2)
    run("edit", ws, "--prompt", "blue cube", "--name", "blue")
    run("export", ws, "--edit", "blue", "--codec", "png", "-o", folder / "export")
    first_source = Image.fromarray(video[0])
    edit = Image.fromarray(Workspace.open(ws).read("edits/blue/frames")[0]).resize((180, 180), Image.NEAREST)
    exported = Image.open(folder / "export" / "000000.png").convert("RGB")
    cells = [labelled(np.asarray(first_source), "source 320x180"), labelled(np.asarray(edit), "workspace edit 128x128"),
             labelled(np.asarray(exported), "export 320x180 (tiny: noise)")]
    out = Image.new("RGB", (sum(c.width for c in cells) + 8, cells[0].height), "white")
    x = 0
    for c in cells:
        out.paste(c, (x, 0))
        x += c.width + 4
    return out


def memory_chart(frames: int = 16, size: int = 512, card_gib: float = 12.0) -> Image.Image:
    """Bars of the predicted peak per stage and checkpointing level (bf16 on CUDA), with a card line."""
    bars = [(f"{stage} {level}", predict_stage_peak(stage, frames, size, size, "bf16", level) / GIB)
            for stage in ("invert", "edit") for level in (LEVELS if stage == "invert" else LEVELS[:1])]
    width, height, left, top, bottom = 640, 320, 120, 30, 290
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 8), f"predicted peak, {frames} x {size}x{size}, bf16 (measured memory model)", fill="black", font=font)
    top_gib = max(max(v for _, v in bars), card_gib) * 1.1
    scale = (width - left - 20) / top_gib
    step = (bottom - top) / len(bars)
    for i, (name, gib) in enumerate(bars):
        y = top + i * step
        draw.text((10, y + step / 3), name, fill="black", font=font)
        draw.rectangle([left, y + 6, left + gib * scale, y + step - 6], fill=(31, 119, 180))
        draw.text((left + gib * scale + 4, y + step / 3), f"{gib:.1f} GiB", fill="black", font=font)
    x = left + card_gib * scale
    draw.line([x, top, x, bottom], fill=(214, 39, 40), width=2)
    draw.text((x + 3, bottom + 6), f"{card_gib:g} GiB card", fill=(214, 39, 40), font=font)
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    vd = Path(sys.executable).with_name("vd")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([str(vd), "demo", tmp, "--model", "tiny", "--json", "-q"], capture_output=True,
                              text=True, check=True)
        result = json.loads(done.stdout)
        ws = Workspace.open(result["workspace"])
        strip(ws, "blue").save(args.out / "strip.png")
        shutil.copyfile(Path(result["workspace"]) / "masks" / "preview.gif", args.out / "mask-preview.gif")
        shutil.copyfile(Path(result["workspace"]) / "edits" / "blue" / "preview.gif", args.out / "edit-preview.gif")
        export_strip(Path(tmp), vd).save(args.out / "export.png")
    memory_chart().save(args.out / "memory.png")
    print(args.out)


if __name__ == "__main__":
    main()
