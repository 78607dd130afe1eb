"""Card sizes against the clips that fit: the tables of docs/concepts/memory.md, from the memory model.

    python bench/card_table.py              # prints the Markdown tables
    python bench/card_table.py --json       # the numbers

Every figure is a prediction of stages.models.memory (bench/memory.py's fake-tensor fit on the SD1.5 +
AnimateDiff v3 architecture, bf16 on CUDA), not a GPU measurement. A card of N GB is taken as N GiB less
memory.CUDA_CONTEXT_ALLOWANCE (0.5 GiB, an assumption) for the CUDA context, as `--plan-for` does.
No torch is needed beyond what importing stages.invert brings; it runs in a few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages.invert import InvertConfig  # noqa: E402
from stages.invert.plan import invert_passes  # noqa: E402
from stages.models import memory  # noqa: E402

CARDS = (12, 16, 24, 40, 80)  # GB (binary, as GPU memory is sold)
SIZES = ((256, 256), (384, 384), (512, 512), (640, 640), (768, 768), (512, 768))  # (height, width)
MAX_WINDOW = 32  # the motion module's positional table (stages.method.windows.MAX_WINDOW)
STAGES = {
    "null-text inversion (the default, STDG on)": invert_passes(InvertConfig()),
    "direct inversion": invert_passes(InvertConfig(method="direct")),
    "edit": memory.STAGE_PASSES["edit"],
}


def usable(card_gb: int) -> int:
    return card_gb * memory.GIB - memory.CUDA_CONTEXT_ALLOWANCE


def compute() -> dict[str, Any]:
    """{stage: {card: {"WxH": {level: frames}}}}: the largest window (one window: a clip of that many frames)
    whose stage peak fits the card at each checkpointing level (0: none; stages without a backward: off)."""
    out: dict[str, Any] = {}
    for stage, passes in STAGES.items():
        grad = any(p in memory.GRAD_PASSES for p in passes)
        out[stage] = {}
        for card in CARDS:
            row = {}
            for h, w in SIZES:
                levels = memory.LEVELS if grad else memory.LEVELS[:1]
                row[f"{w}x{h}"] = {level: memory.largest_window(passes, h, w, usable(card), "bf16", level, MAX_WINDOW)
                                   for level in levels}
            out[stage][card] = row
    return out


def sixteen_frames(frames: int = 16, size: int = 512) -> list[dict[str, Any]]:
    """Per card: what `vd invert/edit --dry-run --plan-for CARD --frames 16 --size 512` says (the defaults)."""
    from stages.edit.plan import plan_edit_run
    from stages.invert.plan import parse_target, plan_invert

    rows = []
    for card in CARDS:
        target = parse_target(f"{card}GB")
        inv = plan_invert(None, InvertConfig(prompt="(card table)"), target, frames, (size, size))
        edit = plan_edit_run(None, target=target, frames=frames, size=(size, size))
        rows.append({"card": card, "level": inv["memory"]["checkpointing"]["mode"], "invert": inv["verdict"],
                     "invert_minutes": [c["seconds_total"] / 60 for c in inv["time"]["cards"]],
                     "cards": [c["card"] for c in inv["time"]["cards"]], "edit": edit["verdict"],
                     "edit_minutes": [c["seconds_total"] / 60 for c in edit["time"]["cards"]]})
    return rows


def markdown_sixteen(rows: list[dict[str, Any]]) -> str:
    """The per-card plan of the default clip as Markdown."""
    def minutes(values: list[float]) -> str:
        return " – ".join(f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values)

    lines = ["| card (cards behind the time range) | auto picks | inversion peak GiB | fits | inversion min "
             "(estimate) | edit peak GiB | fits | edit min (estimate) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        inv, edit = r["invert"], r["edit"]
        hint = "" if inv["fits"] else f" (fits with {inv['suggestion']})"
        lines.append(f"| {r['card']} GB ({', '.join(r['cards'])}) | {r['level']} | {inv['peak'] / memory.GIB:.1f} | "
                     f"{'yes' if inv['fits'] else 'no'}{hint} | {minutes(r['invert_minutes'])} | "
                     f"{edit['peak'] / memory.GIB:.1f} | {'yes' if edit['fits'] else 'no'} | "
                     f"{minutes(r['edit_minutes'])} |")
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    """The tables as Markdown."""
    heads = [f"{w}x{h}" for h, w in SIZES]
    lines = []
    for stage, rows in data.items():
        grad = any(p in memory.GRAD_PASSES for p in STAGES[stage])
        what = (f"largest window (frames per UNet call, at most 32) with `--checkpointing` "
                f"{' / '.join(memory.LEVELS)}" if grad else "largest window (frames per UNet call, at most 32; no "
                                                            "backward pass)")
        lines += [f"**{stage}**: {what}", "", "| card | " + " | ".join(heads) + " |",
                  "|---|" + "---|" * len(heads)]
        for card, row in rows.items():
            cells = [" / ".join(str(c[level] or "–") for level in c) for c in row.values()]
            lines.append(f"| {card} GB ({usable(card) / memory.GIB:.1f} GiB) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)
    data = compute()
    sixteen = sixteen_frames()
    if args.json:
        print(json.dumps({"largest_window": data, "sixteen_frames_512": sixteen}, indent=1))
    else:
        print("**16 frames x 512x512, the defaults (null-text with STDG, 50 steps), bf16:**\n\n"
              + markdown_sixteen(sixteen) + "\n\n" + markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
