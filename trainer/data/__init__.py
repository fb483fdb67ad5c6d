"""Training data: the shard offset index and order (`index`), local indexed reads (`indexed`), ranged reads from an
object store (`ranged`) and plain sequential streaming (`stream`).

The choice among the three readers is made here, once: `plan_loader` picks the kind and builds its index before
step 0, `open_loader` makes the loader once the micro-batch is known.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common import check
from manifests import Manifest

from trainer.data.index import ShardIndex, StepSampler, build_index
from trainer.data.indexed import DataSpec, FeatureBatches, make_loader, needed_exts
from trainer.data.ranged import RemoteFeatureBatches, ShardCache, build_remote_index, is_remote
from trainer.data.stream import StreamBatches, make_stream_loader

LOADERS = ("indexed", "ranged", "stream")


@dataclass
class LoaderPlan:
    """Which reader serves the run, and its member index (none for a stream)."""
    kind: str  # indexed: local shards read by offset; ranged: ranged GETs on an object store; stream: sequential
    index: ShardIndex | None


def plan_loader(m: Manifest, spec: DataSpec, *, stream: bool, hflip: bool, index_cache: Path) -> LoaderPlan:
    """--stream reads sequentially (weaker shuffle and resume, trainer/data/stream.py); otherwise local shards are
    read by offset and shards on an object store by ranged GETs, both through a member index built now."""
    if stream:
        check(not hflip, "--stream reads no flipped twins; drop --hflip or --stream")
        return LoaderPlan("stream", None)
    exts = needed_exts(spec, hflip)
    if is_remote(m):
        return LoaderPlan("ranged", build_remote_index(m, exts))
    return LoaderPlan("indexed", build_index(m, exts, cache_dir=index_cache))


def open_loader(plan: LoaderPlan, m: Manifest, spec: DataSpec, *, seed: int, hflip: bool, rank: int, world: int,
                batch: int, micro: int, start_step: int, steps: int, num_workers: int, pin: bool,
                cache_dir: str | None = None, cache_gb: float = 0.0):
    """The loader of micro-batches for steps start_step..steps of this rank (global batch `batch`)."""
    if plan.kind == "stream":
        return make_stream_loader(StreamBatches(m, spec, seed, rank, world, batch, micro, start_step, steps),
                                  num_workers, pin=pin)
    assert plan.index is not None
    if plan.kind == "indexed":
        ds = FeatureBatches(plan.index, spec, seed, hflip)
    else:
        cache = None
        if cache_dir:  # whole shards kept locally after the first read (bounded by cache_gb)
            cache = ShardCache(cache_dir, int(cache_gb * (1 << 30)), [e.sha256 for e in m.shardlist],
                               [e.bytes for e in m.shardlist])
        ds = RemoteFeatureBatches(plan.index, spec, seed, hflip, cache)
    sampler = StepSampler(len(plan.index), batch, rank, world, micro, seed, start_step, steps)
    return make_loader(ds, sampler, num_workers, pin=pin)
