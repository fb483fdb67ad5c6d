"""Activations and statistics of an image set for each network (Inception, DINOv2), from one pass over the images,
cached in HDF5: one entry per (image set, network), keyed by the input's sha256 and the network's weights.

An entry is written to a tmp name while the forward pass runs, finished with its statistics, a sha256 of every
array and a `complete` attribute written last, then renamed into place. A reader accepts only a file whose
attribute and checksum hold; anything else (a killed run's tmp file, a truncated copy) is deleted and rebuilt,
so half a cache is never used. The cache's size bound and its eviction are in evaluation/cache.py.
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
from typing import Any

import numpy as np

from common import UserError
from common.faults import kill_point
from manifests.io import TMP_MARK, atomic_path
from manifests.storage import pid_alive

from evaluation.cache import mark_reference, touch
from evaluation.images import ImageSet
from evaluation.metrics import statistics

CACHE_VERSION = 2  # bump when what goes into an entry changes
ARRAYS = ("pool", "logits", "mu", "sigma", "mu_s", "sigma_s")  # an Inception entry, checksummed in this order
DINO_ARRAYS = ("feats", "mu", "sigma")  # a DINOv2 entry


@dataclass
class DinoActivations:
    """Per-image DINOv2 CLS features and their FD statistics."""
    feats: np.ndarray | None  # (N, D) float32; None when the statistics come from a reference .npz
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    cache: str = "off"
    cache_path: str | None = None


@dataclass
class Activations:
    """Per-image pool3 features and logits, FID/sFID statistics, and the DINOv2 part when it was asked for."""
    pool: np.ndarray | None = None  # (N, 2048) float32
    logits: np.ndarray | None = None  # (N, 1008) float32
    mu: np.ndarray | None = None  # (2048,) float64
    sigma: np.ndarray | None = None  # (2048, 2048) float64
    mu_s: np.ndarray | None = None  # (2023,) float64
    sigma_s: np.ndarray | None = None  # (2023, 2023) float64
    cache: str = "off"  # 'hit' | 'miss' | 'off' (of the Inception entry)
    cache_path: str | None = None
    timing: dict[str, float] = field(default_factory=dict)
    dinov2: DinoActivations | None = None


class _Net:
    """One network in the pass: what it computes per image, what its entry stores, and its statistics."""

    def __init__(self, name: str, model, widths: dict[str, int], stored: tuple[str, ...]):
        self.name, self.model, self.widths, self.stored = name, model, widths, stored

    def run(self, batch: np.ndarray) -> dict[str, Any]:
        if self.name == "inception":
            f = self.model(batch)
            return {"pool": f.pool, "logits": f.logits, "spatial": f.spatial}
        return {"feats": self.model(batch)}

    def stats(self, per_image: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.name == "inception":
            mu, sigma = statistics(per_image["pool"])
            mu_s, sigma_s = statistics(per_image["spatial"])
            return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
        mu, sigma = statistics(per_image["feats"])  # float64, n-1 (EDM2 accumulates in float64 too)
        return {"mu": mu, "sigma": sigma}


def _inception_net(model) -> _Net:
    from evaluation.inception import LOGIT_DIM, POOL_DIM, SPATIAL_DIM
    return _Net("inception", model, {"pool": POOL_DIM, "logits": LOGIT_DIM, "spatial": SPATIAL_DIM}, ARRAYS)


def _dino_net(model) -> _Net:
    return _Net("dinov2", model, {"feats": model.dim}, DINO_ARRAYS)


def set_id(images: ImageSet) -> str:
    """sha256 of what identifies the image set itself (input, transform, count, size): one per sample set."""
    ident = {"input": images.sha256, "transform": images.transform, "count": images.count, "size": list(images.size)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cache_key(images: ImageSet, model) -> str:
    """sha256 of everything that determines the activations: input, transform, count, weights."""
    ident = {"v": CACHE_VERSION, "input": images.sha256, "transform": images.transform, "count": images.count,
             "size": list(images.size), "weights": model.cache_id}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _checksum(arrays: dict[str, np.ndarray], names: tuple[str, ...] = ARRAYS) -> str:
    h = hashlib.sha256()
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


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


def read_entry(path: Path, key: str, names: tuple[str, ...] = ARRAYS) -> dict[str, np.ndarray] | None:
    """The arrays of `path` if it is a complete, intact entry for `key`; a bad entry is deleted."""
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
                arrays = {name: f[name][()] for name in names}
                if _checksum(arrays, names) != f.attrs.get("sha256"):
                    reason = "checksum mismatch"
    except (OSError, KeyError, ValueError) as e:
        reason = f"unreadable ({e})"
    if reason is not None:
        print(f"warning: cache {path} is unusable: {reason}; rebuilding it", file=sys.stderr)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return arrays


def read_cache(path: Path, key: str) -> Activations | None:
    """The cached Inception activations if `path` is a complete, intact entry for `key`."""
    arrays = read_entry(path, key)
    return None if arrays is None else Activations(**arrays, cache="hit", cache_path=str(path))


def _forward(images: ImageSet, nets: list[_Net], batch_size: int, num_workers: int, sink, progress: bool,
             desc: str) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """One pass over the images feeding every net; `sink(start, outputs)` receives each batch (cache writers)."""
    from tqdm import tqdm
    import torch
    n = images.count
    out = {net.name: {k: np.empty((n, w), np.float32) for k, w in net.widths.items()} for net in nets}
    timing = {"decode_wait_s": 0.0, **{_fwd_name(net): 0.0 for net in nets}}
    i = 0
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, file=sys.stderr)
    it = images.batches(batch_size, num_workers)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)  # waiting on decoding (overlapped with the previous forward)
        timing["decode_wait_s"] += time.perf_counter() - t0
        if batch is None:
            break
        b = batch.shape[0]
        if i + b > n:
            raise UserError(f"{images.path} yields more images than the {n} it declares")
        for net in nets:
            t1 = time.perf_counter()
            for k, v in net.run(batch).items():
                out[net.name][k][i:i + b] = v.cpu().numpy()
            if net.model.device.type == "cuda":
                torch.cuda.synchronize()
            timing[_fwd_name(net)] += time.perf_counter() - t1
        if sink is not None:
            sink(i, b, out)
        i += b
        bar.update(b)
    bar.close()
    if i != n:
        raise UserError(f"{images.path} yielded {i} images, expected {n}")
    for net in nets:
        if not all(np.isfinite(a).all() for a in out[net.name].values()):
            raise UserError(f"{images.path}: {net.name} produced non-finite activations (bad weights file?)")
    return out, timing


def _fwd_name(net: _Net) -> str:
    return "forward_s" if net.name == "inception" else f"{net.name}_forward_s"


def compute_activations(images: ImageSet, model=None, *, dinov2=None, batch_size: int = 100, num_workers: int = 4,
                        cache_dir: Path | None = None, progress: bool = True, desc: str = "inception",
                        reference: bool = False) -> Activations:
    """Activations of `images` for Inception (`model`) and/or DINOv2 (`dinov2`): cached entries where complete
    ones exist, the rest from one forward pass that feeds every missing network. `reference` pins the entries
    (the cache bound never evicts a reference)."""
    if images.count < 2:
        raise UserError(f"{images.describe()}: need at least 2 images for statistics")
    nets = ([_inception_net(model)] if model is not None else []) + ([_dino_net(dinov2)] if dinov2 else [])
    found: dict[str, tuple[dict[str, np.ndarray], str, Path | None]] = {}
    todo: list[tuple[_Net, str | None, Path | None]] = []
    for net in nets:
        if cache_dir is None:
            todo.append((net, None, None))
            continue
        key = cache_key(images, net.model)
        final = Path(cache_dir) / f"{key}.h5"
        for p in remove_stale_tmp(final):
            print(f"warning: removed incomplete cache file {p} left by an interrupted run", file=sys.stderr)
        hit = read_entry(final, key, net.stored)
        if hit is not None:
            found[net.name] = (hit, "hit", final)
        else:
            todo.append((net, key, final))
    timing: dict[str, float] = {}
    if todo:
        run = [t[0] for t in todo]
        if cache_dir is None:
            per_image, timing = _forward(images, run, batch_size, num_workers, None, progress, desc)
            for net in run:
                stats, timing["statistics_s"] = _timed_stats(net, per_image[net.name], timing)
                found[net.name] = ({**{k: per_image[net.name][k] for k in net.stored if k in per_image[net.name]},
                                    **stats}, "off", None)
        else:
            timing = _write_cache(images, todo, batch_size, num_workers, progress, desc, found)
    for _, _, final in found.values():
        if final is not None:
            touch(final)
            if reference:
                mark_reference(final)
    acts = Activations(timing=timing)
    if "inception" in found:
        arrays, state, final = found["inception"]
        for k in ARRAYS:
            setattr(acts, k, arrays[k])
        acts.cache, acts.cache_path = state, None if final is None else str(final)
    if "dinov2" in found:
        arrays, state, final = found["dinov2"]
        acts.dinov2 = DinoActivations(**{k: arrays[k] for k in DINO_ARRAYS}, cache=state,
                                      cache_path=None if final is None else str(final))
    return acts


def _timed_stats(net: _Net, per_image: dict[str, np.ndarray], timing: dict[str, float]
                 ) -> tuple[dict[str, np.ndarray], float]:
    t0 = time.perf_counter()
    stats = net.stats(per_image)
    return stats, timing.get("statistics_s", 0.0) + time.perf_counter() - t0


def _write_cache(images: ImageSet, todo: list, batch_size: int, num_workers: int, progress: bool, desc: str,
                 found: dict) -> dict[str, float]:
    """The forward pass for the missing entries, each written through its own tmp file and sealed at the end."""
    import h5py
    n = images.count
    with contextlib.ExitStack() as stack:
        files = {}
        for net, key, final in todo:
            tmp = stack.enter_context(atomic_path(final, "(or pass --no-cache)"))
            f = stack.enter_context(h5py.File(tmp, "w"))
            f.attrs["key"] = key
            f.attrs["complete"] = False
            for name in net.stored:
                if name in net.widths:  # per-image arrays, filled batch by batch
                    f.create_dataset(name, (n, net.widths[name]), np.float32)
            files[net.name] = (net, key, final, f)

        def sink(start, b, out):
            for net, _, _, f in files.values():
                for name in net.stored:
                    if name in net.widths:
                        f[name][start:start + b] = out[net.name][name][start:start + b]
                f.flush()
            kill_point("eval-cache-batch")  # test hook: some batches are in the tmp cache file
        per_image, timing = _forward(images, [t[0] for t in todo], batch_size, num_workers, sink, progress, desc)
        for net, key, final, f in files.values():
            stats, timing["statistics_s"] = _timed_stats(net, per_image[net.name], timing)
            for name, arr in stats.items():
                f.create_dataset(name, data=arr)
            arrays = {**{k: per_image[net.name][k] for k in net.stored if k in net.widths}, **stats}
            f.attrs["sha256"] = _checksum(arrays, net.stored)
            f.attrs["network"] = net.name
            f.attrs["set_id"] = set_id(images)
            f.attrs["input_sha256"] = images.sha256
            f.attrs["input"] = str(images.path)
            f.attrs["transform"] = images.transform
            f.attrs["weights"] = net.model.weights_id
            f.attrs["count"] = n
            f.attrs["complete"] = True  # last: a reader trusts nothing without it
            found[net.name] = (arrays, "miss", final)
    return timing
