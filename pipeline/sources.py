"""Input listing: an ImageFolder tree or WebDataset jpg+cls tars (imagenet-1k-wds layout; brace patterns expanded
by webdataset), in a folder or under an object-store prefix, as a sorted list of items with labels."""
from __future__ import annotations

import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from common import UserError
from common.errors import as_user_error
from manifests import sanitize_key, storage
from manifests.shards import open_tar

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LIST_THREADS = 16  # tars indexed at once (each is a sequential read of its headers; network-bound when remote)
READ_THREADS = 32  # image GETs in flight per decode task (remote inputs)


@dataclass(frozen=True)
class Item:
    """One input image: where its bytes are (a file or object, or a slice of a tar) and its label."""
    key: str
    label: int
    source: str  # recorded in the sample's json: path, or 'shard.tar:member'
    path: str
    offset: int = -1  # -1: the whole file; else byte offset of a tar member
    size: int = -1
    captions: tuple[str, ...] = ()  # text-to-image sources (pipeline/coco.py): every caption of the image

    def __post_init__(self):
        object.__setattr__(self, "captions", tuple(self.captions))  # a list after a JSON round trip

    def to_dict(self) -> dict:
        return asdict(self)

    def read(self) -> bytes:
        """The raw encoded bytes (OSError or UserError if unreadable; a remote object is one (ranged) GET)."""
        p = storage.path(self.path)
        return p.read_bytes() if self.offset < 0 else p.read_range(self.offset, self.size)


@dataclass
class Listing:
    """A sorted source listing; `skipped` holds inputs rejected before decoding (e.g. duplicate keys)."""
    kind: str  # 'imagefolder' | 'webdataset'
    items: list[Item]
    classes: list[str]
    skipped: list[dict]


def list_source(source: str | os.PathLike) -> Listing:
    """List an ImageFolder tree (class folders) or WebDataset tars; a missing/empty source is a UserError."""
    if "{" in str(source):  # e.g. s3://b/imagenet1k-train-{0000..1023}.tar
        from webdataset.shardlists import expand_urls
        return _dedupe(_list_tars([storage.path(u) for u in expand_urls(str(source))]))
    root = storage.path(source)
    if root.is_remote:
        # An object store has no folders, only keys: classes are the first key parts that hold objects.
        return _dedupe(_list_prefix(root))
    if not root.exists():
        raise UserError(f"source not found: {root} (--source)")
    if not os.access(root, os.R_OK):
        raise UserError(f"source is not readable: {root} (--source)")
    if root.is_file():
        if root.suffix != ".tar":
            raise UserError(f"source {root} is a file; expected an ImageFolder folder or a WebDataset .tar")
        return _dedupe(_list_tars([root]))
    with as_user_error("cannot read source", root):
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    tars = [storage.path(e.path) for e in entries if e.is_file() and e.name.endswith(".tar")]
    dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    if tars and not dirs:
        return _dedupe(_list_tars(tars))
    listing = _list_imagefolder(root, dirs)
    if not listing.items:
        raise UserError(f"source {root} is empty: no class folders with files (expected {root}/<class>/<image>)")
    return _dedupe(listing)


def _list_imagefolder(root: Path, dirs: list[os.DirEntry]) -> Listing:
    """Local class folders, empty ones included (each folder is a label, as in torchvision's ImageFolder)."""
    classes = [d.name for d in dirs]  # sorted folder names -> label index (torchvision ImageFolder rule)
    items = []
    for label, d in enumerate(dirs):
        for dirpath, subdirs, files in os.walk(d.path):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                items.append(Item(key=sanitize_key(Path(name).stem), label=label, source=rel, path=path))
    return Listing("imagefolder", items, classes, [])


def _list_prefix(root: "storage.ObjectPath") -> Listing:
    """`s3://bucket/prefix`: top-level tars (WebDataset), else class folders of images (ImageFolder)."""
    root.check_bucket()
    objects = root.find()
    if not objects:
        raise UserError(f"source not found or empty: {root} (--source)")
    rels = [(o, PurePosixPath(o.relative_to(root))) for o, _ in objects]
    tars = [o for o, r in rels if len(r.parts) == 1 and r.suffix == ".tar"]
    nested = [(o, r) for o, r in rels if len(r.parts) >= 2 and not any(p.startswith(".") for p in r.parts)]
    if tars and not nested:
        return _list_tars(tars)
    classes = sorted({r.parts[0] for _, r in nested})  # sorted folder names -> label index (ImageFolder rule)
    label = {c: i for i, c in enumerate(classes)}
    items = [Item(key=sanitize_key(r.stem), label=label[r.parts[0]], source=r.as_posix(), path=str(o))
             for o, r in sorted(nested, key=lambda t: (t[1].parts[0], t[1].as_posix()))]
    if not items:
        raise UserError(f"source {root} is empty: no class folders with files (expected {root}/<class>/<image>)")
    return Listing("imagefolder", items, classes, [])


def _list_tars(tars: list) -> Listing:
    """Index many tars at once (each one a sequential read of its headers), merged in the given order."""
    if not tars:
        raise UserError("WebDataset source matches no tars (--source)")
    with ThreadPoolExecutor(min(LIST_THREADS, len(tars))) as ex:
        parts = list(ex.map(_index_tar, tars))
    items = [it for its, _ in parts for it in its]
    skipped = [s for _, sk in parts for s in sk]
    if not items:
        raise UserError(f"WebDataset source {tars[0].parent} is empty: no jpg+cls samples in {len(tars)} tar(s)")
    return Listing("webdataset", items, [str(i) for i in range(max(it.label for it in items) + 1)], skipped)


def tar_samples(tar_path, small: tuple[str, ...]) -> tuple[dict[str, dict[str, tarfile.TarInfo]], list[str],
                                                           dict[str, dict[str, bytes]], list[dict]]:
    """One tar's members grouped by sample key, in tar order: (groups, key order, the bytes of the `small` members
    read now, skipped unsafe members). Headers only otherwise; an unreadable tar is one UserError naming it."""
    skipped: list[dict] = []
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    data: dict[str, dict[str, bytes]] = {}
    try:
        with open_tar(tar_path) as tar:
            for ti in tar:
                if not ti.isfile():
                    continue
                if ti.name.startswith("/") or ".." in ti.name.split("/"):
                    skipped.append({"key": sanitize_key(ti.name), "source": f"{tar_path.name}:{ti.name}",
                                    "reason": "unsafe tar member name (absolute or '..')"})
                    continue  # never read, never a sample
                key, dot, ext = os.path.basename(ti.name).partition(".")
                if not dot:
                    continue
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = ti
            for key in order:  # small members (cls, captions): read now, so planning knows them
                for ext in small:
                    if ext in groups[key]:
                        f = tar.extractfile(groups[key][ext])
                        data.setdefault(key, {})[ext] = f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot read WebDataset shard {tar_path}: {e}") from e
    return groups, order, data, skipped


def _label(raw: bytes | None) -> int | None:
    try:
        return int(raw.decode().strip()) if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        return None


def _index_tar(tar_path) -> tuple[list[Item], list[dict]]:
    """The jpg+cls samples of one tar (headers only, plus the tiny cls members) and the members it skips."""
    items = []
    groups, order, data, skipped = tar_samples(tar_path, ("cls",))
    for key in order:
        g = groups[key]
        img_ext = next((x for x in WDS_IMAGE_EXTS if x in g), None)
        label = _label(data.get(key, {}).get("cls"))
        src = f"{tar_path.name}:{key}"
        if img_ext is None or label is None:
            why = "no image member" if img_ext is None else "missing or bad cls member"
            skipped.append({"key": sanitize_key(key), "source": src, "reason": why})
            continue
        ti = g[img_ext]
        items.append(Item(key=sanitize_key(key), label=label, source=f"{tar_path.name}:{ti.name}",
                          path=str(tar_path), offset=ti.offset_data, size=ti.size))
    return items, skipped


def read_items(items: list[Item]) -> list:
    """Raw bytes of each input (or the OSError/UserError that stops it), fetched concurrently when remote."""
    def read(it):
        try:
            return it.read()
        except (OSError, UserError) as e:
            return e
    if not any(storage.path(it.path).is_remote for it in items):
        return [read(it) for it in items]
    with ThreadPoolExecutor(READ_THREADS) as ex:
        return list(ex.map(read, items))


def _dedupe(listing: Listing) -> Listing:
    """Keys must be unique: a later input whose key is taken goes to `skipped`."""
    seen: dict[str, str] = {}
    keep = []
    for it in listing.items:
        if it.key in seen:
            listing.skipped.append({"key": it.key, "source": it.source,
                                    "reason": f"duplicate key (same file stem as {seen[it.key]})"})
            continue
        seen[it.key] = it.source
        keep.append(it)
    listing.items = keep
    return listing


def select(items: list[Item], limit: int | None) -> list[Item]:
    """--limit N: N items spread evenly over the sorted list, so every class is represented."""
    if limit is None or limit >= len(items):
        return items
    n = len(items)
    return [items[i * n // limit] for i in range(limit)]
