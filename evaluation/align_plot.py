"""Figures drawn with PIL only (no matplotlib): layer-wise curves (paper Fig. 3a/b) and token PCA maps (Fig. 38)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from manifests import atomic_write_bytes

PANEL = (520, 380)  # width, height of one curve panel in pixels
MARGIN = dict(left=64, right=16, top=36, bottom=48)
LINE = (31, 119, 180)  # the matplotlib default blue, for a familiar look
REF = (214, 39, 40)
GRID = (225, 225, 225)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed bitmap size
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    for mult in (1, 2, 2.5, 5, 10):
        if span / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def curve_panel(xs: Sequence[int], ys: Sequence[float], *, title: str, ylabel: str,
                ref: float | None = None, ref_label: str = "") -> Image.Image:
    """One line plot of ys over layer numbers xs, with an optional dashed horizontal reference line."""
    w, h = PANEL
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(14), _font(11)
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    vals = [y for _, y in pts] + ([ref] if ref is not None and math.isfinite(ref) else [])
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    pad = (hi - lo) * 0.1 or 0.05
    lo, hi = lo - pad, hi + pad
    x0, x1 = MARGIN["left"], w - MARGIN["right"]
    y0, y1 = MARGIN["top"], h - MARGIN["bottom"]
    xmin, xmax = (min(xs), max(xs)) if xs else (0, 1)
    xmax = xmax if xmax > xmin else xmin + 1

    def px(x: float) -> float:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - lo) / (hi - lo) * (y1 - y0)

    for tv in _nice_ticks(lo, hi):
        d.line([(x0, py(tv)), (x1, py(tv))], fill=GRID)
        d.text((x0 - 6, py(tv)), f"{tv:.3g}", fill="black", font=fs, anchor="rm")
    step = max(1, math.ceil(len(xs) / 14))
    for xv in list(xs)[::step]:
        d.line([(px(xv), y1), (px(xv), y1 + 4)], fill="black")
        d.text((px(xv), y1 + 6), str(xv), fill="black", font=fs, anchor="mt")
    d.rectangle([x0, y0, x1, y1], outline="black")
    if ref is not None and math.isfinite(ref):
        for xa in range(int(x0), int(x1), 12):
            d.line([(xa, py(ref)), (min(xa + 6, x1), py(ref))], fill=REF, width=2)
        d.text((x1 - 4, py(ref) - 4), ref_label, fill=REF, font=fs, anchor="rb")
    if len(pts) > 1:
        d.line([(px(x), py(y)) for x, y in pts], fill=LINE, width=2)
    for x, y in pts:
        d.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=LINE)
    d.text(((x0 + x1) / 2, 10), title, fill="black", font=f, anchor="mt")
    d.text(((x0 + x1) / 2, h - 6), "layer", fill="black", font=fs, anchor="mb")
    label = Image.new("RGB", (y1 - y0, 16), "white")
    ImageDraw.Draw(label).text(((y1 - y0) / 2, 8), ylabel, fill="black", font=fs, anchor="mm")
    img.paste(label.rotate(90, expand=True), (4, y0))
    return img


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
    """One row: the PCA map of each image, upscaled with nearest neighbours, under a title."""
    maps = pca_rgb(tokens)
    cells = [Image.fromarray(m).resize((cell, cell), Image.NEAREST) for m in maps]
    row = hstack(cells, gap=4)
    out = Image.new("RGB", (max(row.width, 120), row.height + 20), "white")
    ImageDraw.Draw(out).text((2, 3), title, fill="black", font=_font(12))
    out.paste(row, (0, 20))
    return out


def vstack(images: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    """Place images top to bottom on a white background."""
    h = sum(i.height for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (max(i.width for i in images), h), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out
