"""Loader throughput from a local S3 server (moto over HTTP) vs. local disk, for the same shards.

    python tests/benchmarks/bench_storage.py [--samples 256] [--batch 32] [--workers 2]

Needs the `s3` extra. moto keeps objects in memory and serves them from one Python thread, so the S3 figures are a
floor for the client side (ranged GETs, concurrency, decode), not a forecast for a real bucket.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from helpers import make_features_manifest  # noqa: E402
from s3_fixture import start_server  # noqa: E402

from manifests import load_manifest, storage  # noqa: E402
from trainer.data.indexed import StepSampler, build_index, make_loader, needed_exts, resolve_fields  # noqa: E402
from trainer.data.ranged import build_remote_index, make_dataset  # noqa: E402
from trainer.data.stream import StreamBatches, make_stream_loader  # noqa: E402


def drain(loader) -> int:
    n = 0
    for b in loader:
        n += len(b["keys"])
    return n


def indexed(url: str, batch: int, workers: int, cache: str | None = None) -> float:
    """img/s of one epoch through the trainer's indexed loader (local pread or ranged GETs)."""
    m = load_manifest(url)
    spec = resolve_fields(m, None, 2, False)
    exts = needed_exts(spec, False)
    index = build_remote_index(m, exts) if storage.is_url(url) else build_index(m, exts)
    ds = make_dataset(m, index, spec, 0, False, cache, 10.0)
    steps = m.num_samples // batch
    loader = make_loader(ds, StepSampler(len(index), batch, 0, 1, batch, 0, 0, steps), workers, pin=False)
    t0 = time.perf_counter()
    n = drain(loader)
    return n / (time.perf_counter() - t0)


def streamed(url: str, batch: int, workers: int) -> float:
    m = load_manifest(url)
    spec = resolve_fields(m, None, 2, False)
    steps = m.num_samples // batch
    loader = make_stream_loader(StreamBatches(m, spec, 0, 0, 1, batch, batch, 0, steps), workers, pin=False)
    t0 = time.perf_counter()
    n = drain(loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=64, help="samples per shard (moto copies the whole object "
                    "for every ranged GET, so smaller shards show the client side better)")
    a = ap.parse_args()
    server, info = start_server()
    os.environ.update(info.env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "feats"
            m = make_features_manifest(local, num=a.samples, shard_size=a.shard_size, encoders={"dinov2-vit-b": 768})
            storage.filesystem("s3").mkdir("bench")
            url = "s3://bench/feats"
            for p in sorted(local.rglob("*")):
                if p.is_file():
                    (storage.path(url) / p.relative_to(local).as_posix()).upload(p)
            mb = sum(e.bytes for e in m.shardlist) / a.samples / 1024
            print(f"loader, {a.samples} samples of {mb:.0f} KiB (latent 8x32x32 fp32 + 256x768 fp16 tokens), "
                  f"{a.shard_size} per shard, batch {a.batch}, one epoch each")
            rows = [("local disk, pread", indexed(str(local), a.batch, 0)),
                    (f"local disk, pread, {a.workers} workers", indexed(str(local), a.batch, a.workers)),
                    ("S3 (moto), ranged GETs", indexed(url, a.batch, 0)),
                    (f"S3 (moto), ranged GETs, {a.workers} workers", indexed(url, a.batch, a.workers))]
            cache = str(Path(tmp) / "cache")
            indexed(url, a.batch, 0, cache)  # fills the cache (downloads run beside the ranged GETs)
            time.sleep(1.0)
            rows += [("S3 (moto), --cache-dir warm", indexed(url, a.batch, 0, cache)),
                     ("S3 (moto), --stream", streamed(url, a.batch, 0)),
                     ("local disk, --stream", streamed(str(local), a.batch, 0))]
            for name, v in rows:
                print(f"  {name:40s} {v:8.1f} img/s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
