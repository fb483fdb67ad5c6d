"""Preprocessing both sides of the contract must agree on: the image crop and the latent scale.

The pipeline applies these before encoding; evaluation applies the same crop to reference images and the trainer
the same scale to latents. The manifest records which (`preprocess.crop`, `fields.latent.vae.scaling_factor`).
"""
from __future__ import annotations

from PIL import Image

# Rombach et al. (LDM), SD-VAE; REPA train.py `latents_scale` / `latents_bias`.
SD_VAE_SCALE = 0.18215
SD_VAE_SHIFT = 0.0


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


def uvit_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """U-ViT `center_crop` (datasets.py, MS-COCO): RGB, the centre square of the shorter side, LANCZOS to res.

    The square starts at ((w - side) // 2, (h - side) // 2), the extra pixel of an odd margin going to the right or
    bottom. It is cut out before resizing: resizing with `box=` would let the filter read pixels outside the square.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")  # MSCOCODatabase._load_image converts on load, before the crop
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = img.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), resample=Image.LANCZOS)


CROPS = {"adm-center": adm_center_crop, "uvit-center": uvit_center_crop}  # manifest `preprocess.crop` -> the rule
CROP_FLAGS = {"adm": "adm-center", "uvit": "uvit-center"}  # `--crop` value -> manifest name (DESIGN §8)
