"""The MS-COCO captions layout (`captions_{train,val}2014.json`), read by both sides: the pipeline extracts its images
and captions (pipeline/coco.py), the sampler draws prompts from the val annotations (trainer/sampling/prompts.py).
Both take images in sorted id order and each image's captions in the file's order, as U-ViT does."""
from __future__ import annotations

from typing import Any

from common import UserError

from .io import read_json
from . import storage

COCO_HINT = "expected MS-COCO's captions layout: {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', " \
            "'caption'}]} (captions_train2014.json)"


def _int_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_coco(captions: str) -> tuple[list[dict], list[dict]]:
    """The annotation file's (images, annotations), checked for COCO's shape; anything else is one-line UserError."""
    p = storage.path(captions)
    raw = read_json(p, "annotation file (--captions)")
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list) \
            or not isinstance(raw.get("annotations"), list):
        raise UserError(f"annotation file {p} is not COCO JSON: {COCO_HINT}")
    for i, im in enumerate(raw["images"]):
        if not (isinstance(im, dict) and _int_id(im.get("id")) and isinstance(im.get("file_name"), str)
                and im["file_name"]):
            raise UserError(f"annotation file {p} is not COCO JSON: images[{i}] = {str(im)[:80]} has no integer "
                            f"'id' and 'file_name'")
    for i, a in enumerate(raw["annotations"]):
        if not (isinstance(a, dict) and _int_id(a.get("image_id"))):
            raise UserError(f"annotation file {p} is not COCO JSON: annotations[{i}] = {str(a)[:80]} has no "
                            f"integer 'image_id'")
    return raw["images"], raw["annotations"]


def captions_by_image(images: list[dict], annotations: list[dict]) -> list[tuple[int, str, list[str]]]:
    """(image id, file name, its text captions) for each listed image with at least one non-empty text caption,
    in sorted id order; captions in the file's order (the pipeline's list_coco also reports what it drops)."""
    names = {}
    for im in images:
        names.setdefault(im["id"], im["file_name"])
    caps: dict[int, list[str]] = {}
    for a in annotations:
        text = a.get("caption")
        if a["image_id"] in names and isinstance(text, str) and text.strip():
            caps.setdefault(a["image_id"], []).append(text)
    return [(iid, names[iid], caps[iid]) for iid in sorted(names) if iid in caps]
