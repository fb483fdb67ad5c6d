"""Figures drawn with matplotlib: layer-wise curves (paper Fig. 3a/b) and token PCA maps (Fig. 38); PIL pastes them."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from manifests import atomic_write_bytes

PANEL_INCHES = (5.2, 3.8)  # one curve panel; at DPI this is 520x380 pixels
DPI = 100


def _render(fig) -> Image.Image:
    """A matplotlib Figure -> RGB PIL image (Agg, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def curve_panel(xs: Sequence[int], ys: Sequence[float], *, title: str, ylabel: str,
                ref: float | None = None, ref_label: str = "", model: str = "SiT") -> Image.Image:
    """One line plot of ys over layer numbers xs, with an optional dashed horizontal reference line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=PANEL_INCHES, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color="C0", label=f"{model} layer")
    if ref is not None and math.isfinite(ref):
        ax.axhline(ref, color="C3", linestyle="--", label=ref_label or "reference")
    if ref is not None and math.isfinite(ref):  # a legend only when there is something to tell apart
        ax.legend(loc="best", frameon=False, fontsize=9)
    ax.set_title(title)
    ax.set_xlabel(f"layer ({model} block, 1-based)")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    return _render(fig)


def hstack(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Place images side by side on a white background."""
    w = sum(i.width for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (w, max(i.height for i in images)), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def save_png(img: Image.Image, path: str | Path) -> None:
    """Encode in memory, then write atomically."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def pca_rgb(tokens: np.ndarray, grid: tuple[int, int] | None = None) -> np.ndarray:
    """(P, T, D) token features -> (P, h, w, 3) uint8: the first 3 principal components as RGB.

    One PCA is fitted over the tokens of all P images together (as DINOv2's figures do), so a colour means
    the same direction in every image; each component is min-max scaled to [0, 255].
    """
    p, t, dim = tokens.shape
    gh, gw = grid or (int(round(t ** 0.5)),) * 2
    if gh * gw != t:
        raise ValueError(f"{t} tokens do not form a {gh}x{gw} grid")
    x = tokens.reshape(p * t, dim).astype(np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comp = x @ vt[:3].T  # (P*T, <=3)
    if comp.shape[1] < 3:
        comp = np.pad(comp, ((0, 0), (0, 3 - comp.shape[1])))
    lo, hi = comp.min(axis=0), comp.max(axis=0)
    comp = (comp - lo) / np.where(hi > lo, hi - lo, 1.0)
    return (comp.reshape(p, gh, gw, 3) * 255).round().astype(np.uint8)


def pca_strip(tokens: np.ndarray, title: str, cell: int = 96) -> Image.Image:
    """One row: the PCA map of each image (nearest-neighbour pixels), under a title."""
    from matplotlib.figure import Figure
    maps = pca_rgb(tokens)
    n = len(maps)
    head = 0.3  # inches for the title
    fig = Figure(figsize=(max(n * cell / DPI, 1.6), cell / DPI + head), dpi=DPI)
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, m in zip(axes, maps):
        ax.imshow(m, interpolation="nearest")
        ax.set_axis_off()
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=1 - head / (cell / DPI + head), wspace=0.04)
    return _render(fig)


def vstack(images: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    """Place images top to bottom on a white background."""
    h = sum(i.height for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (max(i.width for i in images), h), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out
