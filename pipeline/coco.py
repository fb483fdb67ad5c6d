"""Captioned sources for the text-to-image path (DESIGN §9): the MS-COCO layout (an image folder and
captions_{train,val}2014.json), or WebDataset tars of jpg + txt/json captions; local or on an object store.

One sample per image, keyed by its COCO image id (zero-padded, so key order is id order), in sorted id order as
U-ViT's extract_mscoco_feature.py takes them, with every caption in the annotation file's order. Problems with one
image or caption go to `skipped`; an annotation file that is not COCO JSON stops the job with one line.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from common import UserError
from common.errors import as_user_error
from manifests import sanitize_key, storage
from manifests.captions import read_coco

from .sources import LIST_THREADS, WDS_IMAGE_EXTS, Item, Listing, _dedupe, tar_samples

CAPTION_EXTS = ("txt", "json")


def list_captioned(source: str, captions: str | None) -> Listing:
    """`--source IMAGES --captions ANNOTATIONS.json` (COCO), or `--source` tars whose samples carry captions."""
    if captions:
        return list_coco(source, captions)
    return _dedupe(_list_caption_tars(_tar_paths(source)))


def coco_key(image_id: int) -> str:
    """Sample key of a COCO image: its id, zero-padded as COCO's file names are (sorted keys = sorted ids)."""
    return f"{image_id:012d}"


def list_coco(source: str, captions: str) -> Listing:
    """Images listed by the annotation file that exist under `source`, in sorted id order, with their captions."""
    images, anns = read_coco(captions)
    ann_name = storage.path(captions).name
    root = storage.path(source)
    files = _files_under(root)
    skipped: list[dict] = []
    by_id: dict[int, dict] = {}
    for im in images:
        iid = im["id"]
        if iid in by_id:
            skipped.append({"key": coco_key(iid), "source": im["file_name"],
                            "reason": f"duplicate image id {iid} in {ann_name} (first: {by_id[iid]['file_name']})"})
            continue
        by_id[iid] = im
    caps: dict[int, list[str]] = {}
    for a in anns:
        iid, text = a["image_id"], a.get("caption")
        where = f"{ann_name}: annotation {a.get('id', '?')}"
        if iid not in by_id:
            skipped.append({"key": coco_key(iid), "source": where,
                            "reason": f"caption for image id {iid}, which {ann_name} does not list"})
        elif not isinstance(text, str):
            skipped.append({"key": coco_key(iid), "source": where,
                            "reason": f"caption is not text ({type(text).__name__})"})
        elif not text.strip():
            skipped.append({"key": coco_key(iid), "source": where, "reason": "empty caption"})
        else:
            caps.setdefault(iid, []).append(text)  # the file's order, as COCO's imgToAnns keeps it
    items = []
    for iid in sorted(by_id):
        name = by_id[iid]["file_name"]
        rel = _relative(name)
        if iid not in caps:
            skipped.append({"key": coco_key(iid), "source": name, "reason": f"no captions in {ann_name}"})
        elif rel is None:
            skipped.append({"key": coco_key(iid), "source": name, "reason": "unsafe file_name (absolute or '..')"})
        elif rel not in files:
            skipped.append({"key": coco_key(iid), "source": name, "reason": f"image id {iid} has no image file "
                                                                            f"under {root}"})
        else:
            items.append(Item(key=coco_key(iid), label=0, source=rel, path=str(root / rel),
                              captions=tuple(caps[iid])))
    if not items:
        first = f" (first: {skipped[0]['source']}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"no image of {ann_name} has both a file under {root} and a caption{first}")
    return Listing("coco", items, [], skipped)


def _relative(name: str) -> str | None:
    """A COCO file_name as a relative POSIX path under the image folder; None if it would leave it."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        return None
    return p.as_posix()


def _files_under(root) -> set[str]:
    """Relative names of every file under the image folder (one listing, local or remote)."""
    if root.is_remote:
        root.check_bucket()
    elif not root.is_dir():
        raise UserError(f"image folder not found: {root} (--source)")
    with as_user_error("cannot list image folder", root):
        found = root.find()
    if not found:
        raise UserError(f"image folder {root} is empty (--source)")
    return {PurePosixPath(str(p.relative_to(root))).as_posix() for p, _ in found}


# ----------------------------------------------------------------------------- WebDataset tars with captions
def _tar_paths(source: str) -> list:
    """The tars of `--source`: a brace pattern, one .tar, a folder of tars or an object-store prefix of tars."""
    if "{" in source:
        from webdataset.shardlists import expand_urls
        return [storage.path(u) for u in expand_urls(source)]
    root = storage.path(source)
    if root.is_remote:
        root.check_bucket()
        tars = [o for o, _ in root.find() if len(PurePosixPath(o.relative_to(root)).parts) == 1 and o.suffix == ".tar"]
    elif root.is_file():
        tars = [root] if root.suffix == ".tar" else []
    elif root.is_dir():
        tars = [storage.path(os.path.join(root, n)) for n in sorted(os.listdir(root)) if n.endswith(".tar")]
    else:
        raise UserError(f"source not found: {root} (--source)")
    if not tars:
        raise UserError(f"source {root} has no WebDataset tars; text-to-image input is an image folder with "
                        f"--captions ANNOTATIONS.json, or tars of jpg + txt/json captions")
    return sorted(tars)


def _list_caption_tars(tars: list) -> Listing:
    with ThreadPoolExecutor(min(LIST_THREADS, len(tars))) as ex:
        parts = list(ex.map(_index_caption_tar, tars))
    items = [it for its, _ in parts for it in its]
    skipped = [s for _, sk in parts for s in sk]
    if not items:
        raise UserError(f"WebDataset source {tars[0].parent} has no image + caption samples in {len(tars)} tar(s)")
    return Listing("webdataset", items, [], skipped)


def tar_captions(members: dict[str, bytes]) -> list[str]:
    """A sample's captions: json 'captions' (a list) or 'caption'/'text' (a string), else the txt member (one
    caption). Raises ValueError with the skip reason."""
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"json member is not JSON ({e})") from None
        if isinstance(meta, dict):
            got = meta.get("captions", meta.get("caption", meta.get("text")))
            if got is not None:
                got = [got] if isinstance(got, str) else got
                if not isinstance(got, list) or not all(isinstance(c, str) for c in got):
                    raise ValueError("caption is not text (json 'captions' must be strings)")
                if got and all(c.strip() for c in got):
                    return got
                raise ValueError("empty caption")
    if "txt" in members:
        try:
            text = members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("caption is not text (txt member is not UTF-8)") from None
        if not text.strip():
            raise ValueError("empty caption")
        return [text.strip()]
    raise ValueError("no captions (no txt member, no caption in json)")


def _index_caption_tar(tar_path) -> tuple[list[Item], list[dict]]:
    """The image + caption samples of one tar (headers, plus the small txt/json members read now)."""
    items = []
    groups, order, texts, skipped = tar_samples(tar_path, CAPTION_EXTS)
    for key in order:
        g = groups[key]
        img_ext = next((x for x in WDS_IMAGE_EXTS if x in g), None)
        src = f"{tar_path.name}:{key}"
        if img_ext is None:
            skipped.append({"key": sanitize_key(key), "source": src, "reason": "no image member"})
            continue
        try:
            caps = tar_captions(texts.get(key, {}))
        except ValueError as e:
            skipped.append({"key": sanitize_key(key), "source": src, "reason": str(e)})
            continue
        ti = g[img_ext]
        items.append(Item(key=sanitize_key(key), label=0, source=f"{tar_path.name}:{ti.name}", path=str(tar_path),
                          offset=ti.offset_data, size=ti.size, captions=tuple(caps)))
    return items, skipped
