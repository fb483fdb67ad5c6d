"""The U-ViT crop (MS-COCO text-to-image) against its rule written out with numpy slicing and PIL, as U-ViT does."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from manifests.preprocess import CROP_FLAGS, CROPS, adm_center_crop, uvit_center_crop


def uvit_reference(img: Image.Image, res: int) -> np.ndarray:
    """U-ViT datasets.py: convert("RGB") on load; rows/cols [(n - crop) // 2 : (n + crop) // 2]; LANCZOS."""
    arr = np.array(img.convert("RGB")).astype(np.uint8)
    crop = min(arr.shape[:2])
    arr = arr[(arr.shape[0] - crop) // 2:(arr.shape[0] + crop) // 2,
              (arr.shape[1] - crop) // 2:(arr.shape[1] + crop) // 2]
    return np.array(Image.fromarray(arr, "RGB").resize((res, res), Image.LANCZOS)).astype(np.uint8)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w,h,res", [(640, 480, 256), (375, 500, 256), (333, 517, 256), (517, 334, 64),
                                     (1001, 999, 512), (100, 61, 256), (256, 256, 256), (300, 300, 256)])
def test_uvit_crop_matches_reference(w, h, res):
    img = _noise(w, h, seed=w * h)
    got = uvit_center_crop(img, res)
    assert got.mode == "RGB" and got.size == (res, res)
    assert np.array_equal(np.asarray(got), uvit_reference(img, res))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_uvit_crop_converts_other_modes_first(mode):
    base = _noise(90, 70, seed=5)
    img = base.convert("P") if mode == "P" else base.convert("L").convert(mode) if mode in ("LA", "I;16") \
        else base.convert(mode)
    got = uvit_center_crop(img, 48)
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), uvit_reference(img, 48))


def test_uvit_offsets_by_hand():
    """No resize (side == res): the result is exactly the square at ((w - side) // 2, (h - side) // 2)."""
    arr = np.arange(4 * 7 * 3, dtype=np.uint8).reshape(4, 7, 3)  # h 4, w 7: margin 3, left 1 (extra column right)
    assert np.array_equal(np.asarray(uvit_center_crop(Image.fromarray(arr), 4)), arr[:, 1:5])
    tall = np.arange(9 * 4 * 3, dtype=np.uint8).reshape(9, 4, 3)  # h 9, w 4: top 2
    assert np.array_equal(np.asarray(uvit_center_crop(Image.fromarray(tall), 4)), tall[2:6])


def test_uvit_filter_sees_only_the_square():
    """A bright margin outside the square must not bleed in (it would with resize(box=...))."""
    arr = np.zeros((64, 96, 3), dtype=np.uint8)
    arr[:, :16] = arr[:, 80:] = 255  # margins are exactly the 16 columns each side
    assert np.asarray(uvit_center_crop(Image.fromarray(arr), 24)).max() == 0


def test_crop_registry():
    assert CROPS["adm-center"] is adm_center_crop and CROPS["uvit-center"] is uvit_center_crop
    assert set(CROP_FLAGS.values()) == set(CROPS)
    img = _noise(640, 480)  # the two rules differ on the same image (BOX+BICUBIC vs LANCZOS)
    assert not np.array_equal(np.asarray(adm_center_crop(img, 256)), np.asarray(uvit_center_crop(img, 256)))
