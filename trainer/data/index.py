"""Where the samples are and in which order: the shard offset index and the step-indexed global shuffle."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from manifests import Manifest, atomic_write_json, index_shard, sanitize_key
from common import check

INDEX_VERSION = 1


@dataclass
class ShardIndex:
    """Flat arrays over all samples: shard id, key, and (offset, size) per needed member."""
    paths: list[str]
    shard: np.ndarray  # (N,) int32
    keys: np.ndarray  # (N,) str
    members: dict[str, np.ndarray]  # ext -> (N, 2) int64 [offset, size]

    def __len__(self) -> int:
        return len(self.keys)


def _cached_index(path: Path, entry, cache_dir: Path | None) -> dict[str, dict[str, list[int]]]:
    """Tar member offsets of one shard, computed from headers once and cached under the run folder."""
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"{sanitize_key(entry.url)}.json"
        if cache.is_file():
            try:
                d = json.loads(cache.read_text())
                if d.get("version") == INDEX_VERSION and d.get("sha256") == entry.sha256 \
                        and d.get("bytes") == path.stat().st_size:
                    return d["index"]
            except (OSError, ValueError):
                pass  # a bad cache is rebuilt
    idx = index_shard(path)
    if cache is not None:
        atomic_write_json(cache, {"version": INDEX_VERSION, "sha256": entry.sha256,
                                  "bytes": path.stat().st_size, "index": idx})
    return idx


def build_index(m: Manifest, exts: list[str], cache_dir: Path | None = None) -> ShardIndex:
    """Index the listed shards only; every sample must have every needed member."""
    return assemble_index(m, [_cached_index(m.root / e.url, e, cache_dir) for e in m.shardlist], exts)


def assemble_index(m: Manifest, indexes: list[dict[str, dict[str, list[int]]]], exts: list[str]) -> ShardIndex:
    """One flat index from each listed shard's member offsets; every sample must have every needed member."""
    paths, shard_ids, keys = [], [], []
    members: dict[str, list[list[int]]] = {e: [] for e in exts}
    for si, (entry, idx) in enumerate(zip(m.shardlist, indexes)):
        check(len(idx) == entry.nsamples, f"shard '{entry.url}' holds {len(idx)} samples, manifest says "
                                          f"{entry.nsamples}")
        paths.append(str(m.root / entry.url))
        for key, mem in idx.items():
            for e in exts:
                check(e in mem, f"shard '{entry.url}': sample '{key}' has no member '.{e}'")
                members[e].append(mem[e])
            shard_ids.append(si)
            keys.append(key)
    return ShardIndex(paths=paths, shard=np.asarray(shard_ids, np.int32), keys=np.asarray(keys),
                      members={e: np.asarray(v, np.int64).reshape(-1, 2) for e, v in members.items()})


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The global order of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


class StepSampler:
    """Yields (step, positions, sample ids) for this rank's micro-batches from `start_step` on.

    Global position p = step*batch + j walks through concatenated epochs, so the data position is just the
    step (exact resume) and an epoch end never stalls a rank. Rank r takes slots [r*B/W, (r+1)*B/W) of each
    global batch, so ranks see disjoint shares; each share is cut into micro-batches for accumulation.
    """

    def __init__(self, n: int, batch: int, rank: int, world: int, micro: int, seed: int, start_step: int,
                 steps: int):
        self.n, self.batch, self.rank, self.world, self.micro, self.seed = n, batch, rank, world, micro, seed
        self.start_step, self.steps = start_step, steps
        self.local = batch // world
        self._perm: tuple[int, np.ndarray] | None = None

    def ids(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty(len(positions), np.int64)
        for k, p in enumerate(positions):
            epoch = int(p) // self.n
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, epoch_permutation(self.seed, epoch, self.n))
            out[k] = self._perm[1][int(p) % self.n]
        return out

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for step in range(self.start_step, self.steps):
            first = step * self.batch + self.rank * self.local
            for m0 in range(0, self.local, self.micro):
                pos = np.arange(first + m0, first + min(m0 + self.micro, self.local), dtype=np.int64)
                yield step, pos, self.ids(pos)
