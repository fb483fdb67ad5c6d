"""`--stream`: plain sequential shard reads with webdataset, for stores where ranged GETs are slow or costly.

Weaker than the indexed reader, by design: there is no global shuffle (each rank reads whole shards in a seeded
per-epoch shard order, samples in file order), and a rank's epoch ends on its own. Resume is at shard level plus a
sample offset: rank r's position after `step` steps is step*B/W samples into its own stream, which is mapped back
to (epoch, shard, offset) from the manifest's per-shard counts; the resumed stream re-opens that shard and skips
`offset` samples, so it continues with exactly the samples an uninterrupted run would have read next.
"""
from __future__ import annotations

import io
import itertools
from typing import Any, Iterator

import numpy as np
import torch

from manifests import Manifest, storage
from common import UserError
from manifests.codecs import CODECS, check_scales, scale_field
from manifests.shards import CLS, npy_ext

from trainer.data.context import pick_caption
from trainer.data.indexed import LATENT, DataSpec


def shard_order(seed: int, epoch: int, n: int, rank: int, world: int) -> list[int]:
    """Rank r's shards in epoch e: a seeded permutation of all shards, every world-th one (disjoint ranks)."""
    perm = np.random.default_rng([seed, epoch, 0x57EA]).permutation(n)
    return [int(s) for s in perm[rank::world]]


def locate(counts: list[int], seed: int, rank: int, world: int, consumed: int) -> tuple[int, int, int]:
    """(epoch, index into the rank's shard list, sample offset) of the `consumed`-th sample of rank's stream."""
    check_counts = [c for c in counts if c > 0]
    if not check_counts:
        raise UserError("--stream: the manifest lists no samples")
    epoch = 0
    while True:
        order = shard_order(seed, epoch, len(counts), rank, world)
        total = sum(counts[s] for s in order)
        if total == 0:
            raise UserError(f"--stream: {world} ranks but only {len(counts)} shard(s); rank {rank} gets none "
                            f"(use fewer ranks or more shards)")
        if consumed < total:
            for i, s in enumerate(order):
                if consumed < counts[s]:
                    return epoch, i, consumed
                consumed -= counts[s]
        consumed -= total
        epoch += 1


class StreamBatches(torch.utils.data.IterableDataset):
    """Micro-batches from a sequential webdataset read of this rank's shards, starting at `start_step`."""

    def __init__(self, m: Manifest, spec: DataSpec, seed: int, rank: int, world: int, batch: int, micro: int,
                 start_step: int, steps: int):
        self.urls = [str(p) for p in m.shard_paths()]
        self.counts = [e.nsamples for e in m.shardlist]
        self.spec, self.seed, self.rank, self.world = spec, seed, rank, world
        self.batch, self.local, self.micro = batch, batch // world, micro
        self.start_step, self.steps = start_step, steps

    def _urls_from(self, epoch: int, i: int) -> Iterator[str]:
        for e in itertools.count(epoch):
            order = shard_order(self.seed, e, len(self.urls), self.rank, self.world)
            for s in order[i if e == epoch else 0:]:
                yield self.urls[s]

    def _samples(self) -> Iterator[dict[str, Any]]:
        """Raw samples (bytes per member) from the resume point on, via webdataset's tar expansion."""
        from webdataset.tariterators import group_by_keys, tar_file_expander
        epoch, i, offset = locate(self.counts, self.seed, self.rank, self.world, self.start_step * self.local)

        def opened():
            for url in self._urls_from(epoch, i):
                yield {"url": url, "stream": storage.path(url).open("rb")}  # reads retried block by block
        samples = group_by_keys(tar_file_expander(opened()))
        return itertools.islice(samples, offset, None)  # the sample offset inside the first shard

    def _array(self, s: dict, ext: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        try:
            a = np.load(io.BytesIO(s[ext]), allow_pickle=False)
        except (KeyError, ValueError) as e:
            raise UserError(f"shard {s.get('__url__')}: sample '{s.get('__key__')}' has no readable '.{ext}' "
                            f"({e})") from e
        if a.shape != shape or a.dtype != dtype:
            raise UserError(f"shard {s.get('__url__')}: member '{s['__key__']}.{ext}' has shape {list(a.shape)} "
                            f"{a.dtype}, the manifest says {list(shape)} {dtype}")
        return a

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sp = self.spec
        c, h = sp.in_channels, sp.input_size
        samples = self._samples()
        for step in range(self.start_step, self.steps):
            first = step * self.batch + self.rank * self.local
            for m0 in range(0, self.local, self.micro):
                n = min(self.micro, self.local - m0)
                rows = list(itertools.islice(samples, n))
                pos0 = first + m0
                x = np.empty((n, 2 * c, h, h), np.float32)  # the moments; the step draws the latent on the device
                zs = [np.empty((n, sp.tokens, d), np.dtype(dt)) for d, dt in zip(sp.z_dims, sp.enc_dtypes)]
                codecs = [CODECS[c] for c in (sp.enc_codecs or ["float16"] * len(sp.encoders))]
                scales = [np.empty((n, sp.tokens), np.float16) if cd.scaled else None for cd in codecs]
                cls, ctx = [], self._contexts(rows, pos0) if sp.context is not None else None
                for j, s in enumerate(rows):
                    x[j] = self._array(s, npy_ext(LATENT), (2 * c, h, h), np.dtype(np.float32))  # (2C, H, W)
                    cls.append(int(s[CLS].decode().strip()))
                    for k, name in enumerate(sp.encoders):
                        zs[k][j] = self._array(s, npy_ext(name), (sp.tokens, sp.z_dims[k]), zs[k].dtype)  # (T, D)
                        if scales[k] is not None:  # 8-bit codes: their per-token scales (manifests/codecs.py)
                            scales[k][j] = self._array(s, npy_ext(scale_field(name)), (sp.tokens,), scales[k].dtype)
                            # the indexed reader's finiteness check, and more: a bad scale stops with one line
                            check_scales(scales[k][j], codecs[k], f"shard {s.get('__url__')}: sample "
                                         f"'{s['__key__']}' '.{npy_ext(scale_field(name))}'", zs[k][j])
                yield {"step": step, "x": torch.from_numpy(x), "y": torch.tensor(cls, dtype=torch.int64),
                       "zs": [torch.from_numpy(z) for z in zs], "keys": [s["__key__"] for s in rows],
                       "zscales": [None if z is None else torch.from_numpy(z) for z in scales],
                       "codecs": [cd.name for cd in codecs],
                       "tag": torch.tensor([pos0]), "pos0": pos0, **(ctx or {})}

    def _contexts(self, rows: list[dict], pos0: int) -> dict[str, Any]:
        """Text families: each sample's chosen caption (the indexed reader's rule, trainer/data/context.py)."""
        cs = self.spec.context
        codes = np.empty((len(rows), cs.length, cs.dim), cs.storage)  # (n, L, D) as stored
        scales = np.empty((len(rows), cs.length), np.float16) if cs.scaled else None  # (n, L)
        picked = []
        for j, s in enumerate(rows):
            where = f"shard {s.get('__url__')}: member '{s['__key__']}.{npy_ext(cs.name)}'"
            try:
                all_codes = np.load(io.BytesIO(s[npy_ext(cs.name)]), allow_pickle=False)  # (K, L, D)
            except (KeyError, ValueError) as e:
                raise UserError(f"{where} is missing or unreadable ({e})") from e
            if all_codes.shape[1:] != (cs.length, cs.dim) or all_codes.dtype != cs.storage or not len(all_codes):
                raise UserError(f"{where} has shape {list(all_codes.shape)} {all_codes.dtype}, the manifest says "
                                f"[K, {cs.length}, {cs.dim}] {cs.storage}")
            all_scales = self._array(s, npy_ext(scale_field(cs.name)), all_codes.shape[:2], np.dtype(np.float16)) \
                if cs.scaled else None
            codes[j], row_scale, k = pick_caption(all_codes, all_scales, self.seed, pos0 + j)
            if scales is not None:
                scales[j] = row_scale
                check_scales(row_scale, CODECS[cs.codec], f"{where} (caption {k})", codes[j])
            picked.append(k)
        return {"y": torch.from_numpy(codes), "yscale": None if scales is None else torch.from_numpy(scales),
                "ycodec": cs.codec, "captions": picked}


def make_stream_loader(ds: StreamBatches, num_workers: int, pin: bool):
    """One reader process at most: a stream is sequential, so more workers would read the same samples twice."""
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(num_workers, 1), pin_memory=pin,
                                       prefetch_factor=4 if num_workers > 0 else None,
                                       generator=torch.Generator().manual_seed(0))  # global RNG untouched
