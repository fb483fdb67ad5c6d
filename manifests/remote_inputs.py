"""Inputs that a stage needs as local files (a checkpoint for torch.load, an ADM .npz, a shard set for evaluation,
an HDF5 cache): an object-store input is mirrored once into a local cache, verified, and reused while unchanged;
a local input is used where it is. What to mirror follows the contract (a shard set's manifest and listed shards,
a run folder's newest export); how to mirror is the path object's (manifests/storage.py)."""
from __future__ import annotations

import os
from pathlib import Path

from . import storage
from .objects import mirror_root as cache_root  # noqa: F401 - trainer/loop/remote_run.py mirrors runs under it
from .schema import CONTEXT_CODEC, MANIFEST_NAME, load_manifest
from common.errors import UserError


def localize(loc: str | os.PathLike, what: str = "input") -> Path:
    """A local path for `loc`: a plain path as it is; an object is downloaded; a shard-set folder (its manifest
    and every listed shard, sha256-checked) or a run folder (newest export + config) is mirrored."""
    src = storage.path(loc)
    is_set: list[bool] = []

    def pick(listing: dict[str, int]) -> list[str]:
        if not listing:
            raise UserError(f"{what} not found: {src}")
        if MANIFEST_NAME in listing:  # a shard set: the manifest plus only the shards it lists
            is_set.append(True)
            m = load_manifest(src)  # validates, checks sizes
            extra = [spec["empty"]["file"] for spec in m.fields.values()  # text sets: the empty-caption context
                     if spec.get("codec") == CONTEXT_CODEC and isinstance(spec.get("empty"), dict)]
            return [MANIFEST_NAME] + extra + [e.url for e in m.shardlist]
        # A run folder: the newest export (with its config) or else the newest training checkpoint.
        exports = sorted(k for k in listing if k.startswith("export/ema-") and k.endswith(".safetensors"))
        ckpts = sorted(k for k in listing if k.startswith("checkpoints/") and k.endswith(".pt"))
        chosen = (exports[-1:] + (["export/config.json"] if "export/config.json" in listing else [])
                  if exports else ckpts[-1:])
        if not chosen and what in ("samples", "reference"):  # an image folder under a prefix: mirror all of it
            chosen = sorted(listing)
        if not chosen:
            raise UserError(f"{what} {src} holds neither a manifest.json nor checkpoints")
        return chosen

    local = src.mirror(pick)
    if is_set:
        load_manifest(local, verify=True)  # sha256 of every local copy
    return local


def sync_down(url: str, suffix: str) -> Path:
    """Mirror the files ending in `suffix` under `url` (e.g. an HDF5 cache folder) into a local folder."""
    return storage.path(url).mirror(lambda listing: [k for k in sorted(listing) if k.endswith(suffix)])


def sync_up(local: Path, url: str, suffix: str) -> int:
    """Upload local files ending in `suffix` that the store lacks (whole objects); returns how many."""
    return storage.path(url).mirror_up(local, suffix)
