"""Inputs that a stage needs as local files (a checkpoint for torch.load, an ADM .npz, a shard set for evaluation,
an HDF5 cache): fetched from an object store once into a local cache, verified, and reused while unchanged."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import storage
from .schema import MANIFEST_NAME
from common.errors import UserError



def cache_root() -> Path:
    """REPA_REMOTE_CACHE, else ~/.cache/repa/remote (XDG_CACHE_HOME respected)."""
    base = os.environ.get("REPA_REMOTE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
        / "repa" / "remote"
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _mirror_dir(url: str) -> Path:
    return cache_root() / hashlib.sha256(url.encode()).hexdigest()[:24]


def _fetch(obj: storage.ObjectPath, dest: Path, size: int | None = None) -> Path:
    """Download `obj` to `dest` unless a copy of the same size is already there."""
    n = obj.stat().st_size if size is None else size
    if dest.is_file() and dest.stat().st_size == n:
        return dest
    storage.copy_to_local(obj, dest)
    if dest.stat().st_size != n:
        raise UserError(f"cannot read {obj}: download ended early (truncated object?)")
    return dest


def localize(loc: str | os.PathLike, what: str = "input") -> Path:
    """A local path for `loc`: plain paths as they are; an object is downloaded; a shard-set folder (its manifest
    and every listed shard, sha256-checked) or a run folder (newest export + config) is mirrored."""
    if not storage.is_url(loc):
        return storage.path(loc)  # type: ignore[return-value]
    obj = storage.path(loc)
    assert isinstance(obj, storage.ObjectPath)
    local = _mirror_dir(obj.url)
    if obj.is_file():
        return _fetch(obj, local / obj.name)
    obj.check_bucket()
    listing = {str(o.relative_to(obj)): n for o, n in obj.find()}
    if not listing:
        raise UserError(f"{what} not found: {obj}")
    if MANIFEST_NAME in listing:  # a shard set: the manifest plus only the shards it lists
        from .schema import load_manifest
        m = load_manifest(obj)  # validates, checks sizes
        _fetch(obj / MANIFEST_NAME, local / MANIFEST_NAME, listing[MANIFEST_NAME])
        for e in m.shardlist:
            _fetch(obj / e.url, local / e.url, e.bytes if e.bytes >= 0 else None)
        load_manifest(local, verify=True)  # sha256 of every local copy
        return local
    # A run folder: the newest export (with its config) or else the newest training checkpoint.
    exports = sorted(k for k in listing if k.startswith("export/ema-") and k.endswith(".safetensors"))
    ckpts = sorted(k for k in listing if k.startswith("checkpoints/") and k.endswith(".pt"))
    pick = exports[-1:] + (["export/config.json"] if exports and "export/config.json" in listing else []) \
        if exports else ckpts[-1:]
    if not pick and what in ("samples", "reference"):  # an image folder under a prefix: mirror all of it
        pick = sorted(listing)
    if not pick:
        raise UserError(f"{what} {obj} holds neither a manifest.json nor checkpoints")
    for k in pick:
        _fetch(obj / k, local / k, listing[k])
    return local


def sync_down(url: str, suffix: str) -> Path:
    """Mirror the files ending in `suffix` under `url` (e.g. an HDF5 cache folder) into a local folder."""
    obj = storage.path(url)
    assert isinstance(obj, storage.ObjectPath)
    obj.check_bucket()
    local = _mirror_dir(obj.url)
    local.mkdir(parents=True, exist_ok=True)
    for o, n in obj.find():
        if o.name.endswith(suffix):
            _fetch(o, local / str(o.relative_to(obj)), n)
    return local


def sync_up(local: Path, url: str, suffix: str) -> int:
    """Upload local files ending in `suffix` that the store lacks (whole objects); returns how many."""
    obj = storage.path(url)
    assert isinstance(obj, storage.ObjectPath)
    have = {str(o.relative_to(obj)): n for o, n in obj.find()}
    n = 0
    for p in sorted(local.rglob(f"*{suffix}")):
        rel = p.relative_to(local).as_posix()
        if p.name.startswith(".tmp-") or have.get(rel) == p.stat().st_size:
            continue
        (obj / rel).upload(p)
        n += 1
    return n
