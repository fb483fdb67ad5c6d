"""A dependency-light loss curve (PIL only; matplotlib is not a dependency) drawn from stats.jsonl."""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from manifests import atomic_write_bytes

SERIES = (("loss", (31, 119, 180)), ("denoise", (44, 160, 44)), ("proj_loss", (214, 39, 40)))


def read_stats(path: str | os.PathLike) -> list[dict]:
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return rows


def draw_loss_png(stats_path: str | os.PathLike, out_path: str | os.PathLike, size=(640, 400)) -> None:
    """Plot loss, denoise and proj loss against step; written atomically."""
    from PIL import Image, ImageDraw
    rows = read_stats(stats_path)
    w, h = size
    left, right, top, bottom = 60, 20, 20, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = {name: [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))
                  and math.isfinite(r[name])] for name, _ in SERIES}
    allv = [v for s in pts.values() for _, v in s]
    steps = [s for series in pts.values() for s, _ in series]
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    if allv and steps:
        lo, hi = min(allv), max(allv)
        hi = hi if hi > lo else lo + 1
        s0, s1 = min(steps), max(steps)
        s1 = s1 if s1 > s0 else s0 + 1

        def xy(s, v):
            return (left + (s - s0) / (s1 - s0) * (w - left - right),
                    h - bottom - (v - lo) / (hi - lo) * (h - top - bottom))
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            y = xy(s0, v)[1]
            d.line([left - 4, y, left, y], fill="black")
            d.text((4, y - 6), f"{v:.3g}", fill="black")
        d.text((left, h - bottom + 6), f"step {s0}", fill="black")
        d.text((w - right - 90, h - bottom + 6), f"step {s1}", fill="black")
        for i, (name, color) in enumerate(SERIES):
            if len(pts[name]) >= 2:
                d.line([xy(s, v) for s, v in pts[name]], fill=color, width=2)
            d.text((left + 10 + 110 * i, h - 18), name, fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(out_path, buf.getvalue())
