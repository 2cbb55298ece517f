"""A dependency-free scatter plot (Pillow only) of Avg.Gap against run time for the comparison report."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from erasure.media import save_png


SIZE, MARGIN = (640, 420), 60


def _scale(values: list[float], lo_px: int, hi_px: int, log: bool) -> list[float]:
    data = [math.log10(max(v, 1e-3)) for v in values] if log else values
    lo, hi = min(data), max(data)
    span = (hi - lo) or 1.0
    return [lo_px + (v - lo) / span * (hi_px - lo_px) for v in data]


def gap_vs_time(points: dict[str, tuple[float, float]], path: Path, title: str) -> None:
    """Write a PNG with one labelled point per method: x = run time (s, log scale), y = Avg.Gap."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    width, height = SIZE
    left, right, top, bottom = MARGIN, width - MARGIN // 2, MARGIN // 2 + 10, height - MARGIN
    draw.rectangle([left, top, right, bottom], outline="black")
    names = list(points)
    xs = _scale([points[n][0] for n in names], left + 15, right - 15, log=True)
    ys = _scale([points[n][1] for n in names], bottom - 15, top + 15, log=False)
    for name, x, y in zip(names, xs, ys):
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(31, 119, 180))
        draw.text((x + 6, y - 6), name, fill="black")
    times = [points[n][0] for n in names]
    gaps = [points[n][1] for n in names]
    draw.text((left, bottom + 10), f"run time {min(times):.3g}s", fill="black")
    draw.text((right - 110, bottom + 10), f"{max(times):.3g}s (log scale)", fill="black")
    draw.text((5, bottom - 10), f"{min(gaps):.2f}", fill="black")
    draw.text((5, top), f"{max(gaps):.2f}", fill="black")
    draw.text((5, (top + bottom) // 2), "Avg.Gap", fill="black")
    draw.text((left, 8), title, fill="black")
    save_png(path, image)
