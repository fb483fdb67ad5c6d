"""Image decoding and the ADM centre crop (the ADM / REPA preprocessing rule)."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImage(Exception):
    """An input that cannot become a sample; the message is the `skipped` reason."""


def adm_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """ADM `center_crop_arr`: BOX-halve while short side >= 2*res, BICUBIC to short side res, centre crop, RGB."""
    if img.mode != "RGB":
        img = img.convert("RGB")  # REPA's dataset tool converts on load, before any resize (grayscale, CMYK, P)
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    top, left = (h - resolution) // 2, (w - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def decode_crop(data: bytes, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded bytes -> (uint8 crop (R, R, 3), original (w, h)); raises BadImage with a reason."""
    if not data:
        raise BadImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # decode fully here: truncated data fails now, not later
                size = im.size
                crop = adm_center_crop(im, resolution)
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        reason = "truncated image" if "truncated" in msg.lower() else "corrupt image"
        raise BadImage(f"{reason} ({msg})") from None
    return np.asarray(crop, dtype=np.uint8), size
