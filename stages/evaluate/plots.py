"""`vd eval --plot`: one PNG line chart per per-frame metric, drawn with PIL only."""

from __future__ import annotations

import math
from typing import Any

from stages.evaluate.config import as_number
from stages.io.workspace import Workspace

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_chart(series: dict[str, list[float | None]], title: str, width: int = 720, height: int = 400) -> Any:
    """A PNG-ready PIL line chart: x = frame index, one line per series; non-finite points leave gaps."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, width - 20, 36, height - 40
    draw.text((left, 10), title, fill="black", font=font)
    finite = [v for vals in series.values() for v in vals if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) + 1e-3), hi + 0.5 * (abs(hi) + 1e-3)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = max((len(v) for v in series.values()), default=1)
    xmax = max(n - 1, 1)

    def px(i: float, v: float) -> tuple[float, float]:
        return left + (right - left) * i / xmax, bottom - (bottom - top) * (v - lo) / (hi - lo)

    draw.rectangle((left, top, right, bottom), outline="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = px(0, v)[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 6), f"{v:.4g}", fill="black", font=font)
    step = max(1, n // 16)
    for i in range(0, n, step):
        x = px(i, lo)[0]
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 3, bottom + 6), str(i), fill="black", font=font)
    draw.text(((left + right) // 2 - 15, height - 16), "frame", fill="black", font=font)
    lines: list[tuple[str, tuple[int, int, int]]] = []
    for idx, (name, vals) in enumerate(series.items()):
        color = PALETTE[idx % len(PALETTE)]
        lines.append((name, color))
        run: list[tuple[float, float]] = []
        for i, v in enumerate(list(vals) + [None]):
            if v is not None and math.isfinite(v):
                run.append(px(i, v))
                continue
            if len(run) > 1:
                draw.line(run, fill=color, width=2)
            for p in run:
                draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=color)
            run = []
    # legend last, on a white box, so lines never hide it
    draw.rectangle((right - 156, top + 4, right - 4, top + 10 + 14 * len(lines)), fill="white", outline="gray")
    for idx, (name, color) in enumerate(lines):
        ly = top + 6 + 14 * idx
        draw.line((right - 150, ly + 6, right - 130, ly + 6), fill=color, width=3)
        draw.text((right - 125, ly), name[:20], fill="black", font=font)
    return img


def write_plots(ws: Workspace, items: dict[str, Any]) -> list[str]:
    """One PNG per per-frame metric under eval/plots/, each comparing every evaluated item."""
    by_metric: dict[str, dict[str, list[float | None]]] = {}
    for name, item in items.items():
        for key, vals in item.get("per_frame", {}).items():
            by_metric.setdefault(key, {})[name] = [as_number(v) for v in vals]
    written = []
    for key, series in by_metric.items():
        rel = f"eval/plots/{key}.png"
        with ws.atomic_file(rel) as tmp:
            line_chart(series, f"{key} per frame").save(tmp, format="PNG")
        written.append(rel)
    return written
