"""Input listing: an ImageFolder tree or a WebDataset of jpg+cls tars, as a sorted list of items with labels."""
from __future__ import annotations

import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from common import UserError
from manifests import sanitize_key, storage
from common.errors import os_error_message
from manifests.shards import open_tar

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Item:
    """One input image: where its bytes are (a file, or a slice of a tar) and its label."""
    key: str
    label: int
    source: str  # recorded in the sample's json: path, or 'shard.tar:member'
    path: str
    offset: int = -1  # -1: the whole file; else byte offset of a tar member
    size: int = -1

    def to_dict(self) -> dict:
        return asdict(self)

    def read(self) -> bytes:
        """The raw encoded bytes (raises OSError if unreadable; a remote object is one (ranged) GET)."""
        if storage.is_url(self.path):
            obj = storage.path(self.path)
            return obj.read_bytes() if self.offset < 0 else obj.read_range(self.offset, self.size)
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class Listing:
    """A sorted source listing; `skipped` holds inputs rejected before decoding (e.g. duplicate keys)."""
    kind: str  # 'imagefolder' | 'webdataset'
    items: list[Item]
    classes: list[str]
    skipped: list[dict]


def list_source(source: str | os.PathLike) -> Listing:
    """List an ImageFolder tree (class folders) or WebDataset tars; a missing/empty source is a UserError."""
    if storage.is_url(source):  # s3://bucket/prefix or a brace pattern of tar URLs
        from .remote_source import list_remote
        return _dedupe(list_remote(str(source)))
    root = Path(source)
    if not root.exists():
        raise UserError(f"source not found: {root} (--source)")
    if not os.access(root, os.R_OK):
        raise UserError(f"source is not readable: {root} (--source)")
    if root.is_file():
        if root.suffix != ".tar":
            raise UserError(f"source {root} is a file; expected an ImageFolder folder or a WebDataset .tar")
        return _dedupe(_list_wds([root]))
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot read source {os_error_message(e, root)}") from e
    tars = [Path(e.path) for e in entries if e.is_file() and e.name.endswith(".tar")]
    dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    if tars and not dirs:
        return _dedupe(_list_wds(tars))
    listing = _list_imagefolder(root, dirs)
    if not listing.items:
        raise UserError(f"source {root} is empty: no class folders with files (expected {root}/<class>/<image>)")
    return _dedupe(listing)


def _list_imagefolder(root: Path, dirs: list[os.DirEntry]) -> Listing:
    classes = [d.name for d in dirs]  # sorted folder names -> label index (torchvision ImageFolder rule)
    items, skipped = [], []
    for label, d in enumerate(dirs):
        for dirpath, subdirs, files in os.walk(d.path):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                items.append(Item(key=sanitize_key(Path(name).stem), label=label, source=rel, path=path))
    return Listing("imagefolder", items, classes, skipped)


def _list_wds(tars: list[Path]) -> Listing:
    """Index jpg+cls members of each tar (headers only); labels are the `cls` integers."""
    items, skipped = [], []
    max_label = -1
    for tar_path in tars:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        order: list[str] = []
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
                # cls members are tiny: read them now so labels are known before planning.
                labels = {}
                for key in order:
                    g = groups[key]
                    if "cls" in g:
                        f = tar.extractfile(g["cls"])
                        try:
                            labels[key] = int(f.read().decode().strip()) if f else None
                        except ValueError:
                            labels[key] = None
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"cannot read WebDataset shard {tar_path}: {e}") from e
        for key in order:
            g = groups[key]
            img_ext = next((x for x in WDS_IMAGE_EXTS if x in g), None)
            src = f"{tar_path.name}:{key}"
            if img_ext is None or labels.get(key) is None:
                why = "no image member" if img_ext is None else "missing or bad cls member"
                skipped.append({"key": sanitize_key(key), "source": src, "reason": why})
                continue
            ti = g[img_ext]
            max_label = max(max_label, labels[key])
            items.append(Item(key=sanitize_key(key), label=labels[key], source=f"{tar_path.name}:{ti.name}",
                              path=str(tar_path), offset=ti.offset_data, size=ti.size))
    if not items:
        raise UserError(f"WebDataset source {tars[0].parent} is empty: no jpg+cls samples in {len(tars)} tar(s)")
    return Listing("webdataset", items, [str(i) for i in range(max_label + 1)], skipped)


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
