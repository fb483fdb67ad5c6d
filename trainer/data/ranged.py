"""Training from an object store with the local guarantees (global shuffle, disjoint ranks, exact resume):
member offsets come from the pipeline's sidecars, each micro-batch is fetched with concurrent ranged GETs, and an
optional bounded local cache keeps whole shards once read."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from manifests import Manifest, index_shard, storage
from manifests.retry import call, reason, transient
from common import UserError
from manifests.io import read_json

from trainer.data.indexed import FeatureBatches, ShardIndex
from trainer.data.index import assemble_index

SIDECAR_VERSION = 1  # pipeline/writer.py's sidecar format
log = logging.getLogger("repa.cache")


def is_remote(m: Manifest) -> bool:
    return storage.path(m.root).is_remote


def _sidecar_index(m: Manifest, entry) -> dict | None:
    """The member index a pipeline sidecar holds for this exact shard (same sha256), or None."""
    side_path = m.root / (entry.url[:-len(".tar")] + ".json") if entry.url.endswith(".tar") else None
    if side_path is None or not side_path.is_file():
        return None
    try:
        side = read_json(side_path, "sidecar")
    except UserError:
        return None
    if side.get("version") != SIDECAR_VERSION or side.get("sha256") != entry.sha256 or "index" not in side:
        return None
    return side["index"]


def build_remote_index(m: Manifest, exts: list[str]) -> ShardIndex:
    """Like data.build_index, from sidecars (one small GET per shard, concurrent); a shard without one is scanned."""
    def one(entry):
        idx = _sidecar_index(m, entry)
        return idx if idx is not None else index_shard(m.root / entry.url)
    with ThreadPoolExecutor(16) as ex:
        indexes = list(ex.map(one, m.shardlist))
    return assemble_index(m, indexes, exts)


class ShardCache:
    """A bounded folder of whole shards: one download per shard (claimed across loader workers and ranks by an
    O_EXCL file), checked against the manifest's sha256, oldest-used evicted first when over `max_bytes`."""

    def __init__(self, folder: str, max_bytes: int, shas: list[str], sizes: list[int]):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.shas, self.sizes = max_bytes, shas, sizes
        self._pool: ThreadPoolExecutor | None = None
        self._pid = -1
        self.failed: set[int] = set()  # shards whose download failed once: served by ranged GETs from then on
        self.hits = 0  # reads served from the cache (tests check that it served any)

    def path(self, si: int) -> Path:
        return self.dir / f"{self.shas[si][:32]}.tar"  # content-addressed: a replaced shard is a new file

    def local(self, si: int) -> Path | None:
        p = self.path(si)
        try:
            if p.stat().st_size == self.sizes[si]:
                return p
        except FileNotFoundError:
            pass
        return None

    def pread(self, si: int, start: int, size: int) -> bytes | None:
        """`size` bytes at `start` of cached shard `si`, or None if it is not (or no longer) cached: another
        process may evict it between the size check and the open."""
        p = self.local(si)
        if p is None:
            return None
        try:
            with open(p, "rb") as f:
                data = os.pread(f.fileno(), size, start)
        except FileNotFoundError:
            return None
        if len(data) != size:
            return None
        self.hits += 1
        return data

    def request(self, url: str, si: int) -> None:
        """Start a background download of shard `si` unless another reader already has it in hand."""
        if self.sizes[si] > self.max_bytes or si in self.failed or self.local(si) is not None:
            return
        claim = self.path(si).with_suffix(".claim")
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        if self._pool is None or self._pid != os.getpid():  # a forked loader worker starts its own thread
            self._pool, self._pid = ThreadPoolExecutor(1, thread_name_prefix="shard-cache"), os.getpid()
        self._pool.submit(self._download, url, si, claim)

    def _download(self, url: str, si: int, claim: Path) -> None:
        dest = self.path(si)
        try:
            self._evict(self.sizes[si])
            storage.path(url).download(dest)  # retried under the storage policy
            h = hashlib.sha256()
            with open(dest, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            if h.hexdigest() != self.shas[si]:  # never serve bytes the manifest does not vouch for
                dest.unlink(missing_ok=True)
                raise UserError(f"cached copy of {url} does not match the manifest's sha256")
        except (UserError, OSError) as e:
            # The cache is an optimisation: ranged GETs go on without it, but said once, and never retried per
            # micro-batch (a full cache disk or a bad object would otherwise re-download the shard every time).
            self.failed.add(si)
            with contextlib.suppress(OSError):
                dest.unlink(missing_ok=True)
            log.warning("shard cache: not caching %s: %s", url, e)
        finally:
            with contextlib.suppress(OSError):
                claim.unlink()

    def _evict(self, need: int) -> None:
        files = []
        for p in self.dir.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):  # another process evicted it meanwhile
                st = p.stat()
                files.append((st.st_atime, st.st_size, p))
        total = sum(n for _, n, _ in files)
        for _, size, p in sorted(files):
            if total + need <= self.max_bytes:
                break
            total -= size
            with contextlib.suppress(OSError):
                p.unlink()


def fetch_ranges(urls: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
    """Bytes [start, end) of each object, fetched concurrently in one batch; the ranges that fail are fetched
    again under the storage retry policy (manifests/retry.py), so a throttled or reset GET costs a retry, not
    the run. A short read is a truncated object (one line)."""
    objs = [storage.path(u) for u in urls]
    fs, keys = objs[0].fs, [o.key for o in objs]
    out: list = [None] * len(urls)
    todo = list(range(len(urls)))

    def batch() -> None:
        got = fs.cat_ranges([keys[i] for i in todo], [starts[i] for i in todo], [ends[i] for i in todo],
                            on_error="return")
        failed = []
        for i, b in zip(todo, got):
            if isinstance(b, BaseException):
                failed.append((i, b))
            else:
                out[i] = b
        todo[:] = [i for i, _ in failed]
        for i, e in failed:
            if not transient(e):  # what the user must fix, named by its own URL
                raise UserError(f"cannot read {urls[i]}: {reason(e)}") from e
        if failed:
            raise failed[0][1]  # transient: the policy retries the ranges still missing
    call(urls[0] if len(set(urls)) == 1 else f"{urls[0]} (+{len(urls) - 1} ranges)", "read", batch)
    for u, start, end, b in zip(urls, starts, ends, out):
        if len(b) != end - start:
            raise UserError(f"cannot read {u}: object ended early at byte {start + len(b)} (truncated?)")
    return out


class RemoteFeatureBatches(FeatureBatches):
    """FeatureBatches whose reads are served from one concurrent fetch per micro-batch: per sample, one ranged GET
    spanning its needed members (they are adjacent in the tar), or a local pread when the shard is cached."""

    def __init__(self, index: ShardIndex, spec, seed: int, hflip: bool, cache: ShardCache | None = None):
        super().__init__(index, spec, seed, hflip)
        self.cache = cache
        offs = np.stack([v[:, 0] for v in index.members.values()], 1)  # (N, members)
        ends = np.stack([v[:, 0] + v[:, 1] for v in index.members.values()], 1)
        self._span = np.stack([offs.min(1), ends.max(1)], 1)  # (N, 2) [start, end) per sample
        self._blobs: dict[int, tuple[int, bytes]] = {}

    def _fetch(self, ids: np.ndarray) -> None:
        remote_paths, starts, ends, sids = [], [], [], []
        for sid in map(int, ids):
            si = int(self.index.shard[sid])
            start, end = (int(v) for v in self._span[sid])
            cached = self.cache.pread(si, start, end - start) if self.cache is not None else None
            if cached is not None:
                self._blobs[sid] = (start, cached)
                continue
            if self.cache is not None:
                self.cache.request(self.index.paths[si], si)
            remote_paths.append(self.index.paths[si])
            starts.append(start)
            ends.append(end)
            sids.append(sid)
        if not sids:
            return
        for sid, start, b in zip(sids, starts, fetch_ranges(remote_paths, starts, ends)):
            self._blobs[sid] = (start, b)

    def _member(self, sid: int, ext: str) -> bytes:
        off, size = (int(v) for v in self.index.members[ext][sid])
        base, blob = self._blobs[sid]
        return blob[off - base:off - base + size]

    def _read(self, sid: int, ext: str) -> bytes:
        return self._member(sid, ext)

    def _read_npy_into(self, sid: int, ext: str, out: np.ndarray) -> None:
        data = self._member(sid, ext)
        head = self._headers.get(ext)
        if head is None or len(data) != len(head) + out.nbytes or data[:len(head)] != head:
            head = self._check_header(data, sid, ext, len(data), out)  # the local reader's checks and messages
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8, out.nbytes, len(head))

    def _read_sample(self, sid: int, flip: bool, outs: dict[str, list]) -> int:
        return self._read_members(sid, flip, outs)  # the sample's bytes are in memory already

    def _member_bytes(self, sid: int, ext: str, rel: int, size: int) -> bytes:  # caption reads (data/context.py)
        return self._member(sid, ext)[rel:rel + size]

    def _member_into(self, sid: int, ext: str, rel: int, out: np.ndarray) -> None:
        data = self._member(sid, ext)
        if len(data) < rel + out.nbytes:
            raise UserError(f"{self._where(sid, ext)} is truncated")
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8, out.nbytes, rel)

    def __getitem__(self, item):
        self._fetch(item[2])
        try:
            return super().__getitem__(item)
        finally:
            self._blobs.clear()


def make_dataset(m: Manifest, index: ShardIndex, spec, seed: int, hflip: bool, cache_dir: str | None,
                 cache_gb: float) -> FeatureBatches:
    """The local reader for local shards (pread fast path), else the ranged-GET reader (with cache if asked)."""
    if not is_remote(m):
        return FeatureBatches(index, spec, seed, hflip)
    cache = None
    if cache_dir:
        cache = ShardCache(cache_dir, int(cache_gb * (1 << 30)), [e.sha256 for e in m.shardlist],
                           [e.bytes for e in m.shardlist])
    return RemoteFeatureBatches(index, spec, seed, hflip, cache)
