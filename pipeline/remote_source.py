"""Sources on an object store: an ImageFolder under a prefix, or WebDataset jpg+cls tars (imagenet-1k-wds layout,
brace patterns expanded by webdataset); inputs are fetched with concurrent (ranged) GETs."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from common import UserError
from manifests import sanitize_key, storage

LIST_THREADS = 16  # tars indexed at once (each read is network-bound)
READ_THREADS = 32  # image GETs in flight per decode task


def list_remote(source: str):
    """List `s3://bucket/prefix` (ImageFolder or WebDataset tars) or a brace pattern of tar URLs."""
    from .sources import Listing, _list_wds
    if "{" in source:  # e.g. s3://b/imagenet1k-train-{0000..1023}.tar
        from webdataset.shardlists import expand_urls
        tars = [storage.path(u) for u in expand_urls(source)]
        return _list_wds_parallel(tars, _list_wds)
    root = storage.path(source)
    root.check_bucket()
    objects = root.find()
    if not objects:
        raise UserError(f"source not found or empty: {root} (--source)")
    rels = [(o, n, PurePosixPath(o.relative_to(root))) for o, n in objects]
    tars = [o for o, _, r in rels if len(r.parts) == 1 and r.suffix == ".tar"]
    nested = [(o, r) for o, _, r in rels if len(r.parts) >= 2 and not any(p.startswith(".") for p in r.parts)]
    if tars and not nested:
        return _list_wds_parallel(tars, _list_wds)
    from .sources import Item
    classes = sorted({r.parts[0] for _, r in nested})  # sorted folder names -> label index (ImageFolder rule)
    label = {c: i for i, c in enumerate(classes)}
    items = [Item(key=sanitize_key(r.stem), label=label[r.parts[0]], source=r.as_posix(), path=str(o))
             for o, r in sorted(nested, key=lambda t: (t[1].parts[0], t[1].as_posix()))]
    if not items:
        raise UserError(f"source {root} is empty: no class folders with files (expected {root}/<class>/<image>)")
    return Listing("imagefolder", items, classes, [])


def _list_wds_parallel(tars, list_wds):
    """Index many tars at once (each one is a sequential read of its headers), then merge in sorted order."""
    from .sources import Listing
    if not tars:
        raise UserError("WebDataset source matches no tars (--source)")
    with ThreadPoolExecutor(LIST_THREADS) as ex:
        parts = list(ex.map(lambda t: _one_tar(list_wds, t), tars))
    items, skipped, max_label = [], [], -1
    for lst in parts:
        if lst is None:
            continue
        items += lst.items
        skipped += lst.skipped
        max_label = max(max_label, len(lst.classes) - 1)
    if not items:
        raise UserError(f"WebDataset source {tars[0].parent} is empty: no jpg+cls samples in {len(tars)} tar(s)")
    return Listing("webdataset", items, [str(i) for i in range(max_label + 1)], skipped)


def _one_tar(list_wds, tar):
    try:
        return list_wds([tar])
    except UserError as e:
        if "is empty" in str(e):
            return None
        raise


def read_items(items) -> list:
    """Raw bytes of each input (or the OSError/UserError that stops it), fetched concurrently when remote."""
    def read(it):
        try:
            return it.read()
        except (OSError, UserError) as e:
            return e
    if not any(storage.is_url(it.path) for it in items):
        return [read(it) for it in items]
    with ThreadPoolExecutor(READ_THREADS) as ex:
        return list(ex.map(read, items))
