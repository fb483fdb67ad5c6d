"""loss.png from stats.jsonl, drawn with matplotlib (Agg, no pyplot state): one panel per quantity.

The denoising loss and the REPA term live on their own axes (their scales differ by orders of magnitude),
each a faint raw line under an exponentially smoothed one; the denoising loss and the gradient norm use a
log scale, since they fall over decades.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

from manifests import atomic_write_bytes

# (key, title, y label, log scale)
PANELS = (("denoise", "denoising loss", "MSE of the velocity", True),
          ("proj_loss", "REPA alignment term", "-cos(h, y*)  (-1 = aligned)", False),
          ("grad_norm", "gradient norm (before clipping)", "L2 norm", True),
          ("img_per_s", "throughput", "images / s (all ranks)", False))
SMOOTH = 0.9  # EMA weight of the smoothed line (TensorBoard's default 0.6 is too jumpy at log_every=1)


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


def smooth(values: Sequence[float], weight: float = SMOOTH) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider)."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def series(rows: list[dict], key: str, positive: bool) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))
           and math.isfinite(r[key]) and (r[key] > 0 or not positive)]
    return [s for s, _ in pts], [v for _, v in pts]


def loss_figure(rows: list[dict], title: str = ""):
    """A 2x2 matplotlib Figure of PANELS against step."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator
    fig = Figure(figsize=(10, 6.4), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, name, unit, log) in zip(axes, PANELS):
        steps, vals = series(rows, key, positive=log)
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylabel(unit)
        ax.grid(True, which="major", alpha=0.3)
        if not vals:
            ax.text(0.5, 0.5, f"no '{key}' values yet", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
            continue
        ax.plot(steps, vals, color="C0", alpha=0.25, linewidth=1, label="raw")
        if len(vals) > 2:
            ax.plot(steps, smooth(vals), color="C0", linewidth=2, label=f"smoothed (EMA {SMOOTH})")
            ax.legend(loc="best", fontsize=8, frameon=False)
        else:
            ax.plot(steps, vals, "o", color="C0")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            ax.set_yscale("log")
            if max(vals) < 10 * min(vals):  # under a decade: plain tick labels, not 1.05x10^0
                ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)
    last = rows[-1]["step"] if rows else 0
    fig.suptitle(title or f"training curves (up to step {last:,})")
    return fig


def figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def draw_loss_png(stats_path: str | os.PathLike, out_path: str | os.PathLike,
                  rows: list[dict] | None = None) -> None:
    """Plot the curves of stats.jsonl (or the given rows) into out_path, atomically."""
    rows = read_stats(stats_path) if rows is None else rows
    atomic_write_bytes(out_path, figure_png(loss_figure(rows)))


__all__ = ["read_stats", "draw_loss_png", "loss_figure", "figure_png", "smooth", "PANELS"]
