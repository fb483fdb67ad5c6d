"""Exactly-once shard writing: a deterministic plan, tar + sidecar per shard, manifest from the sidecars."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from manifests import Manifest, ShardEntry, atomic_write_json, read_json, sha256_file, write_manifest, write_shard
from common import UserError
from common.faults import kill_point
from manifests.io import remove_tmp_files
from manifests.storage import StoragePath

from .sources import Item

SHARD_DIR = "shards"
SIDECAR_VERSION = 1


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds a fixed, contiguous slice of the sorted input list."""
    index: int
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return f"train-{self.index:06d}"


def plan_shards(items: list[Item], shard_size: int) -> list[ShardPlan]:
    """Slice the sorted inputs into shards before decoding, so the plan never depends on what fails."""
    return [ShardPlan(i // shard_size, tuple(items[i:i + shard_size])) for i in range(0, len(items), shard_size)]


def fingerprint(settings: Mapping[str, Any], items: list[Item]) -> str:
    """Hash of everything that decides shard bytes: settings and the (key, label, source) of every input."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        h.update(f"\0{it.key}\0{it.label}\0{it.source}".encode())
        if it.captions:  # text-to-image inputs: other captions, other contexts (ImageNet fingerprints unchanged)
            h.update(json.dumps(it.captions).encode())
    return h.hexdigest()


def tar_path(out: StoragePath, plan: ShardPlan) -> StoragePath:
    return out / SHARD_DIR / f"{plan.name}.tar"


def sidecar_path(out: StoragePath, plan: ShardPlan) -> StoragePath:
    """`shards/train-000000.json`: keys, counts, sha256, skipped inputs and the tar member index."""
    return out / SHARD_DIR / f"{plan.name}.json"


def clean_tmp(out: StoragePath, before: float | None = None) -> int:
    """Delete half-written tmp files that killed runs left behind (uploads begun before `before`, the lease start)."""
    return remove_tmp_files(out, before) + remove_tmp_files(out / SHARD_DIR, before)


def read_sidecar(out: StoragePath, plan: ShardPlan) -> dict | None:
    """The sidecar, or None if there is none or it is unreadable (then the shard is simply rebuilt)."""
    p = sidecar_path(out, plan)
    if not p.is_file():
        return None
    try:
        side = read_json(p, "sidecar")
    except UserError:
        return None
    return side if isinstance(side, dict) and side.get("version") == SIDECAR_VERSION else None


def shard_done(out: StoragePath, plan: ShardPlan, fp: str, *, verify: bool = False) -> bool:
    """Finished means: sidecar for this plan, and the tar has the recorded size (and sha256 with verify)."""
    side = read_sidecar(out, plan)
    if side is None:
        return False
    if side.get("fingerprint") != fp:
        raise UserError(f"{sidecar_path(out, plan)} comes from a different extract (other settings or inputs); "
                        f"use a new --out or delete {out}")
    if side["nsamples"] == 0:
        return True
    p = tar_path(out, plan)
    if not p.is_file() or p.stat().st_size != side["bytes"]:
        return False  # missing or truncated: rebuild
    return not verify or sha256_file(p) == side["sha256"]


def write_shard_once(out: StoragePath, plan: ShardPlan, fp: str, samples: Iterable[dict], skipped: list[dict],
                     fields: dict[str, Any]) -> dict:
    """Write the tar atomically, then its sidecar atomically: a sidecar only ever describes a whole tar.

    `samples` may be a generator (streamed while the GPU works); an empty list means every input was bad.
    """
    path = tar_path(out, plan)
    side: dict[str, Any] = {"version": SIDECAR_VERSION, "shard": plan.index, "fingerprint": fp,
                            "url": f"{SHARD_DIR}/{path.name}", "skipped": skipped, "fields": fields}
    if isinstance(samples, list) and not samples:  # no tar, but the shard is finished
        side.update(nsamples=0, keys=[], sha256="", bytes=0, index={})
    else:
        info = write_shard(path, samples)
        kill_point("tar-before-sidecar")  # test hook: the tar is in place, its sidecar not yet written
        side.update(nsamples=len(info.keys), keys=info.keys, sha256=info.sha256, bytes=info.bytes, index=info.index)
    atomic_write_json(sidecar_path(out, plan), side)
    kill_point("shard-finished")  # test hook: tar and sidecar in place (kills wait for it with `@shard-finished`)
    return side


def assemble_manifest(out: StoragePath, plans: list[ShardPlan], *, name: str, classes: list[str],
                      preprocess: dict, extra_skipped: list[dict], created_by: dict,
                      field_extra: dict[str, dict] | None = None) -> Manifest:
    """Build and write manifest.json from the sidecars, in plan order, once every shard is finished.

    `field_extra` adds entries the driver made to field records (the text context's `empty` file)."""
    entries, skipped, fields, total_bytes = [], list(extra_skipped), None, 0
    seen: set[str] = set()
    for plan in plans:
        side = read_sidecar(out, plan)
        if side is None:
            raise UserError(f"shard {plan.name} is not finished ({sidecar_path(out, plan)} missing); re-run extract")
        skipped.extend(side["skipped"])
        if fields is None or (not fields and side["fields"]):
            fields = side["fields"]
        if side["nsamples"] == 0:
            continue
        dup = seen.intersection(side["keys"])
        if dup:  # cannot happen with a valid plan; refuse to publish a manifest that breaks exactly-once
            raise UserError(f"shard {plan.name} repeats keys {sorted(dup)[:3]}; delete {out} and re-run")
        seen.update(side["keys"])
        entries.append(ShardEntry(url=side["url"], nsamples=side["nsamples"], sha256=side["sha256"],
                                  bytes=side["bytes"]))
        total_bytes += side["bytes"]
    num = sum(e.nsamples for e in entries)
    for fname, add in (field_extra or {}).items():
        if fields and fname in fields:
            fields[fname] = {**fields[fname], **add}
    if num == 0:
        raise UserError(f"no good inputs: all {len(skipped)} inputs were skipped "
                        f"(first: {skipped[0]['source']}: {skipped[0]['reason']})" if skipped else "no inputs")
    stats = {"bytes_per_sample": round(total_bytes / num, 1), "total_bytes": total_bytes,
             "index": "each shard's member offsets are in shards/<name>.json under 'index'"}
    m = Manifest(root=out, name=name, shardlist=entries, kind="features", num_samples=num, fields=fields or {},
                 classes=classes, preprocess=preprocess, skipped=skipped, created_by=created_by,
                 extra={"stats": stats})
    kill_point("manifest-before-write")  # test hook: every sidecar is written, the manifest not yet
    write_manifest(m)
    return m
