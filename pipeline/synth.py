"""The embedded demo dataset: an ImageNet-style ImageFolder of JPEGs whose classes differ in shape, colour and layout."""
from __future__ import annotations

import colorsys
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from manifests import atomic_write_bytes, atomic_write_json
from common import check
from manifests.io import ensure_writable_dir

CAPTIONS_NAME = "captions.json"  # beside the class folders: `extract --captions OUT/captions.json`
SHAPES = ("disc", "square", "triangle", "cross", "ring", "stripes", "diamond", "checker", "star", "bars")
# A hue per class, spread around the colour wheel so classes differ in colour as well as shape; a place per
# class (fractions of the centre square) so they differ in layout as well.
ANCHORS = ((0.5, 0.5), (0.3, 0.3), (0.7, 0.7), (0.7, 0.3), (0.3, 0.7), (0.5, 0.3), (0.5, 0.7), (0.3, 0.5),
           (0.7, 0.5))
SIZE_RANGE = (300, 600)  # ImageNet-like sides (px)

# Captions (COCO annotation layout, for the text-to-image path): what a person sees in the image, in words.
NOUNS = {"disc": "circle", "square": "square", "triangle": "triangle", "cross": "cross", "ring": "ring",
         "stripes": "vertical stripes", "diamond": "diamond", "checker": "checkerboard", "star": "star",
         "bars": "horizontal bars"}
PATTERNS = ("stripes", "checker", "bars")  # they fill the picture: no place to name
PLACES = {(0.5, 0.5): "in the centre", (0.3, 0.3): "at the top left", (0.7, 0.7): "at the bottom right",
          (0.7, 0.3): "at the top right", (0.3, 0.7): "at the bottom left", (0.5, 0.3): "at the top",
          (0.5, 0.7): "at the bottom", (0.3, 0.5): "on the left", (0.7, 0.5): "on the right"}
HUES = ((15, "red"), (45, "orange"), (80, "yellow"), (120, "lime"), (160, "green"), (200, "cyan"), (245, "blue"),
        (275, "violet"), (305, "purple"), (345, "pink"), (360, "red"))  # (upper hue bound in degrees, name)
TEMPLATES = ("{a}{colour} {noun} {place}", "{colour} {noun} {place} on a dark background",
             "a picture of {a}{colour} {noun}, {place}")
PATTERN_TEMPLATES = ("{a}{colour} {noun}", "{colour} {noun} on a dark background", "a picture of {a}{colour} {noun}")
CAPTION_WORDS = sorted({w.strip(",") for t in TEMPLATES + PATTERN_TEMPLATES for w in t.split() if "{" not in w}
                       | {"a", "an"}
                       | {w for v in (*NOUNS.values(), *PLACES.values()) for w in v.split()}
                       | {name for _, name in HUES} | {"gray", "with", "white", "mark", "corner"})


def class_name(c: int) -> str:
    """WordNet-id-like folder name, so the tree looks like ImageNet's train/<wnid>/."""
    return f"n{c:08d}"


def _colour(c: int, classes: int) -> tuple[int, int, int]:
    h = c / max(classes, 1)
    return tuple(int(255 * (0.5 + 0.5 * math.cos(2 * math.pi * (h + k / 3)))) for k in range(3))


def _layout(c: int) -> tuple[float, float]:
    """The class's anchor inside the centre square (what the ADM crop keeps): classes differ in layout too."""
    return ANCHORS[c % len(ANCHORS)]


def _draw(c: int, classes: int, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """One image of class c: a class-tinted noisy background, and the class's shape, colour and place."""
    col = _colour(c, classes)
    tint = np.array(_colour(c + classes / 2, classes)) * 0.3  # the opposite hue, dark: a class background
    bg = tint + rng.integers(0, 30, size=3)
    grad = np.linspace(0, 40, w)[None, :, None] + np.linspace(0, 25, h)[:, None, None]
    arr = np.clip(bg + grad + rng.normal(0, 10, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    m = min(w, h)  # the centre square; the ADM crop keeps it, so a layout anchor survives the crop
    ax, ay = _layout(c)
    s = int(m * rng.uniform(0.16, 0.24))
    cx = int((w - m) / 2 + m * (ax + rng.uniform(-0.04, 0.04)))
    cy = int((h - m) / 2 + m * (ay + rng.uniform(-0.04, 0.04)))
    box = (cx - s, cy - s, cx + s, cy + s)
    shape = SHAPES[c % len(SHAPES)]
    if shape == "disc":
        d.ellipse(box, fill=col)
    elif shape == "square":
        d.rectangle(box, fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=col)
    elif shape == "cross":
        d.rectangle((cx - s, cy - s // 4, cx + s, cy + s // 4), fill=col)
        d.rectangle((cx - s // 4, cy - s, cx + s // 4, cy + s), fill=col)
    elif shape == "ring":
        d.ellipse(box, outline=col, width=max(s // 4, 2))
    elif shape == "stripes":
        for x in range(0, w, max(s // 3, 4) * 2):
            d.rectangle((x, 0, x + max(s // 3, 4), h), fill=col)
    elif shape == "diamond":
        d.polygon([(cx, cy - s), (cx + s, cy), (cx, cy + s), (cx - s, cy)], fill=col)
    elif shape == "checker":
        q = max(s // 3, 4)
        for y in range(0, h, q):
            for x in range((y // q) % 2 * q, w, 2 * q):
                d.rectangle((x, y, x + q - 1, y + q - 1), fill=col)
    elif shape == "star":
        pts = [(cx + (s if k % 2 == 0 else s // 2.5) * math.cos(math.pi * k / 5 - math.pi / 2),
                cy + (s if k % 2 == 0 else s // 2.5) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)]
        d.polygon(pts, fill=col)
    else:  # bars
        for y in range(0, h, max(s // 3, 4) * 2):
            d.rectangle((0, y, w, y + max(s // 3, 4)), fill=col)
    if c >= len(SHAPES):  # more classes than shapes: a second marker keeps them apart
        d.ellipse((8, 8, 8 + 12 * (c // len(SHAPES)), 20), fill=(255, 255, 255))
    return img


def colour_name(rgb: tuple[int, int, int]) -> str:
    """The everyday name of a saturated colour, by hue."""
    h, _, _ = colorsys.rgb_to_hsv(*(v / 255 for v in rgb))
    return next(name for bound, name in HUES if h * 360 < bound)


def captions_for(c: int, classes: int, gray: bool) -> list[str]:
    """Three captions of an image of class c (its colour, shape and place); a grayscale image is 'gray'."""
    shape = SHAPES[c % len(SHAPES)]
    colour, noun = "gray" if gray else colour_name(_colour(c, classes)), NOUNS[shape]
    article = "" if noun.endswith("s") else "an " if colour[0] in "aeiou" else "a "  # plural patterns take none
    words = {"a": article, "colour": colour, "noun": noun, "place": PLACES[_layout(c)]}
    templates = PATTERN_TEMPLATES if shape in PATTERNS else TEMPLATES
    mark = " with a white mark in the corner" if c >= len(SHAPES) else ""
    return [t.format(**words) + mark for t in templates]


def synthesize(out: str | Path, classes: int = 10, per_class: int = 20, seed: int = 0,
               captions: str | Path | None = None) -> list[Path]:
    """Write out/<wnid>/<wnid>_<j>.JPEG; every 9th image is grayscale ('L'), every 9th+4 is CMYK. Also write the
    captions in MS-COCO's annotation layout (`captions`, default OUT/captions.json): image ids 1.. in file order,
    file names relative to OUT, three captions per image."""
    check(classes > 0, f"--classes must be positive, got {classes}")
    check(per_class > 0, f"--per-class must be positive, got {per_class}")
    root = ensure_writable_dir(out, "synth output folder")
    paths = []
    coco: dict = {"info": {"description": "pipeline synth: the embedded demo set"}, "images": [], "annotations": []}
    for c in range(classes):
        for j in range(per_class):
            i = c * per_class + j
            rng = np.random.default_rng([seed, c, j])
            w, h = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
            img = _draw(c, classes, w, h, rng)
            if i % 9 == 0:
                img = img.convert("L")
            elif i % 9 == 4:
                img = img.convert("CMYK")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            path = root / class_name(c) / f"{class_name(c)}_{j}.JPEG"
            atomic_write_bytes(path, buf.getvalue())
            paths.append(path)
            coco["images"].append({"id": i + 1, "file_name": f"{class_name(c)}/{path.name}", "width": w, "height": h})
            for text in captions_for(c, classes, gray=img.mode == "L"):
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "caption": text})
    atomic_write_json(captions if captions is not None else root / CAPTIONS_NAME, coco)
    return paths
