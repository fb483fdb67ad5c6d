"""Image decoding into the crop the manifest names (`preprocess.crop`; the rules live with the contract in
manifests/preprocess.py): `adm-center` for ImageNet, `uvit-center` for MS-COCO (U-ViT's protocol)."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from manifests.preprocess import CROPS


class BadImage(Exception):
    """An input that cannot become a sample; the message is the `skipped` reason."""


def decode_crop(data: bytes, resolution: int, crop: str = "adm-center") -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded bytes -> (uint8 crop (R, R, 3), original (w, h)) by the named rule; raises BadImage with a reason."""
    rule = CROPS[crop]
    if not data:
        raise BadImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # decode fully here: truncated data fails now, not later
                size = im.size
                out = rule(im, resolution)
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        reason = "truncated image" if "truncated" in msg.lower() else "corrupt image"
        raise BadImage(f"{reason} ({msg})") from None
    return np.asarray(out, dtype=np.uint8), size
