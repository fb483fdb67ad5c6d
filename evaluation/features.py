"""Inception activations and statistics of an image set, cached in HDF5 keyed by the input's sha256.

A cache file is written to a tmp name while the forward pass runs, finished with its statistics, a sha256
of every array and a `complete` attribute written last, then renamed into place. A reader accepts only a
file whose attribute and checksum hold; anything else (a killed run's tmp file, a truncated copy) is deleted
and rebuilt, so half a cache is never used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import UserError
from common.faults import kill_point
from manifests.io import TMP_MARK, atomic_path
from manifests.storage import pid_alive

from evaluation.images import ImageSet
from evaluation.inception import LOGIT_DIM, POOL_DIM, SPATIAL_DIM, InceptionFeatures
from evaluation.metrics import statistics

CACHE_VERSION = 2  # bump when what goes into an entry changes
ARRAYS = ("pool", "logits", "mu", "sigma", "mu_s", "sigma_s")  # checksummed, in this order


@dataclass
class Activations:
    """Per-image pool3 features and logits, and FID/sFID statistics of one image set."""
    pool: np.ndarray  # (N, 2048) float32
    logits: np.ndarray  # (N, 1008) float32
    mu: np.ndarray  # (2048,) float64
    sigma: np.ndarray  # (2048, 2048) float64
    mu_s: np.ndarray  # (2023,) float64
    sigma_s: np.ndarray  # (2023, 2023) float64
    cache: str = "off"  # 'hit' | 'miss' | 'off'
    cache_path: str | None = None
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.pool.shape[0])


def cache_key(images: ImageSet, model: InceptionFeatures) -> str:
    """sha256 of everything that determines the activations: input, transform, count, weights."""
    ident = {"v": CACHE_VERSION, "input": images.sha256, "transform": images.transform, "count": images.count,
             "size": list(images.size), "weights": model.cache_id}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


    return True


def remove_stale_tmp(final: Path) -> list[Path]:
    """Delete tmp files of `final` left by killed writers (their pid no longer runs)."""
    removed = []
    for p in final.parent.glob(f"{TMP_MARK}{final.name}.*"):
        parts = p.name[len(TMP_MARK) + len(final.name) + 1:].split(".")
        if parts and parts[0].isdigit() and int(parts[0]) != os.getpid() and pid_alive(int(parts[0])):
            continue  # another live run is writing it
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def read_cache(path: Path, key: str) -> Activations | None:
    """The cached activations if `path` is a complete, intact entry for `key`; a bad entry is deleted."""
    import h5py
    if not path.is_file():
        return None
    reason = None
    try:
        with h5py.File(path, "r") as f:
            if not bool(f.attrs.get("complete", False)):
                reason = "incomplete (no 'complete' mark)"
            elif f.attrs.get("key") != key:
                reason = "written for another input"
            else:
                arrays = {name: f[name][()] for name in ARRAYS}
                if _checksum(arrays) != f.attrs.get("sha256"):
                    reason = "checksum mismatch"
    except (OSError, KeyError, ValueError) as e:
        reason = f"unreadable ({e})"
    if reason is not None:
        print(f"warning: cache {path} is unusable: {reason}; rebuilding it", file=sys.stderr)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return Activations(**arrays, cache="hit", cache_path=str(path))


def _forward(images: ImageSet, model: InceptionFeatures, batch_size: int, num_workers: int, sink,
             progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Run the network over every image; `sink(start, pool, logits)` receives each batch (cache writer)."""
    from tqdm import tqdm
    import torch
    n = images.count
    pool = np.empty((n, POOL_DIM), np.float32)
    logits = np.empty((n, LOGIT_DIM), np.float32)
    spatial = np.empty((n, SPATIAL_DIM), np.float32)
    t_decode = t_forward = 0.0
    i = 0
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, file=sys.stderr)
    it = images.batches(batch_size, num_workers)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)  # waiting on decoding (overlapped with the previous forward)
        t1 = time.perf_counter()
        t_decode += t1 - t0
        if batch is None:
            break
        b = batch.shape[0]
        if i + b > n:
            raise UserError(f"{images.path} yields more images than the {n} it declares")
        feats = model(batch)
        pool[i:i + b] = feats.pool.cpu().numpy()
        logits[i:i + b] = feats.logits.cpu().numpy()
        spatial[i:i + b] = feats.spatial.cpu().numpy()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t_forward += time.perf_counter() - t1
        if sink is not None:
            sink(i, pool[i:i + b], logits[i:i + b])
        i += b
        bar.update(b)
    bar.close()
    if i != n:
        raise UserError(f"{images.path} yielded {i} images, expected {n}")
    if not (np.isfinite(pool).all() and np.isfinite(spatial).all()):
        raise UserError(f"{images.path}: Inception produced non-finite activations (bad weights file?)")
    return pool, logits, spatial, {"decode_wait_s": t_decode, "forward_s": t_forward}


def _stats(pool: np.ndarray, spatial: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    t0 = time.perf_counter()
    mu, sigma = statistics(pool)
    mu_s, sigma_s = statistics(spatial)
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}, time.perf_counter() - t0


def compute_activations(images: ImageSet, model: InceptionFeatures, *, batch_size: int = 100,
                        num_workers: int = 4, cache_dir: Path | None = None, progress: bool = True,
                        desc: str = "inception") -> Activations:
    """Activations of `images`, from the cache when a complete entry exists, else by a forward pass."""
    if images.count < 2:
        raise UserError(f"{images.describe()}: need at least 2 images for statistics")
    if cache_dir is None:
        pool, logits, spatial, timing = _forward(images, model, batch_size, num_workers, None, progress, desc)
        stats, timing["statistics_s"] = _stats(pool, spatial)
        return Activations(pool=pool, logits=logits, **stats, cache="off", timing=timing)

    key = cache_key(images, model)
    final = Path(cache_dir) / f"{key}.h5"
    for p in remove_stale_tmp(final):
        print(f"warning: removed incomplete cache file {p} left by an interrupted run", file=sys.stderr)
    hit = read_cache(final, key)
    if hit is not None:
        return hit
    return _write_cache(images, model, final, key, batch_size, num_workers, progress, desc)


def _write_cache(images: ImageSet, model: InceptionFeatures, final: Path, key: str, batch_size: int,
                 num_workers: int, progress: bool, desc: str) -> Activations:
    import h5py
    n = images.count
    with atomic_path(final, "(or pass --no-cache)") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["key"] = key
            f.attrs["complete"] = False
            dpool = f.create_dataset("pool", (n, POOL_DIM), np.float32)
            dlogits = f.create_dataset("logits", (n, LOGIT_DIM), np.float32)

            def sink(start, pool, logits):
                dpool[start:start + pool.shape[0]] = pool
                dlogits[start:start + logits.shape[0]] = logits
                f.flush()
                kill_point("eval-cache-batch")  # test hook: some batches are in the tmp cache file
            pool, logits, spatial, timing = _forward(images, model, batch_size, num_workers, sink, progress, desc)
            stats, timing["statistics_s"] = _stats(pool, spatial)
            for name, arr in stats.items():
                f.create_dataset(name, data=arr)
            f.attrs["sha256"] = _checksum({"pool": pool, "logits": logits, **stats})
            f.attrs["input_sha256"] = images.sha256
            f.attrs["input"] = str(images.path)
            f.attrs["transform"] = images.transform
            f.attrs["weights"] = model.weights_id
            f.attrs["count"] = n
            f.attrs["complete"] = True  # last: a reader trusts nothing without it
    return Activations(pool=pool, logits=logits, **stats, cache="miss", cache_path=str(final), timing=timing)
