"""CPU benchmark: decode + ADM centre crop + tar write, images per second per core, on ImageNet-sized JPEGs.

This is the CPU side of `extract` (the Ray decode task plus the shard writer), run in one process on one core,
so the figure is per core. Target: >= 150 img/s per core (then a 16-core host feeds 8 GPUs at 400 img/s with room).
Run: python tests/benchmarks/bench_pipeline.py [--images 300] [--resolution 256]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from manifests import write_shard  # noqa: E402
from pipeline.sources import Item  # noqa: E402
from pipeline.synth import _draw  # noqa: E402
from pipeline.worker import decode_shard  # noqa: E402

TARGET = 150.0  # img/s per core (issue #2)
IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (500, 400), (333, 500)]  # common ImageNet sizes


def make_jpegs(folder: Path, n: int) -> list[Item]:
    """ImageNet-like JPEGs (quality 90, mostly 500x375-ish, landscape and portrait)."""
    items = []
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = IMAGENET_SIZES[i % len(IMAGENET_SIZES)]
        img = _draw(i % 10, 10, w, h, rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        p = folder / f"img_{i:05d}.JPEG"
        p.write_bytes(buf.getvalue())
        items.append(Item(key=f"img_{i:05d}", label=i % 10, source=p.name, path=str(p)))
    return items


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        items = make_jpegs(tmp, args.images)
        kib = sum(os.path.getsize(it.path) for it in items) / len(items) / 1024
        # Warm-up: page cache and PIL codecs, so the timing is the steady state.
        decode_shard({"shard": 0, "resolution": args.resolution,
                      "items": json.dumps([it.to_dict() for it in items[:10]])})
        t_dec = t_wr = 0.0  # CPU seconds of this process: the per-core cost, even on a busy machine
        n = 0
        wall0 = time.perf_counter()
        for s in range(0, len(items), args.shard_size):
            chunk = items[s:s + args.shard_size]
            t0 = time.process_time()
            row = decode_shard({"shard": s, "resolution": args.resolution,
                                "items": json.dumps([it.to_dict() for it in chunk])})
            t1 = time.process_time()
            crops = np.frombuffer(row["images"], np.uint8).reshape(row["n"], args.resolution, args.resolution, 3)
            meta = json.loads(row["meta"])["samples"]
            samples = [{"__key__": m["key"], "cls": m["label"], "json": {"source": m["source"], "size": m["size"]},
                        "crop.npy": crops[i]} for i, m in enumerate(meta)]
            write_shard(tmp / "shards" / f"train-{s:06d}.tar", samples)
            t2 = time.process_time()
            t_dec += t1 - t0
            t_wr += t2 - t1
            n += row["n"]
        wall = time.perf_counter() - wall0
        # Decode alone, to show where the time goes.
        t0 = time.process_time()
        for it in items[:100]:
            with Image.open(it.path) as im:
                im.load()
        t_pil = (time.process_time() - t0) / min(100, len(items))
    total = t_dec + t_wr
    rate = n / total
    print(f"images: {n} ImageNet-sized JPEGs ({kib:.0f} KiB avg), crop {args.resolution}, shards of {args.shard_size}")
    print(f"decode+crop: {n / t_dec:8.1f} img/s  ({1e3 * t_dec / n:.2f} ms/img; PIL decode alone "
          f"{1e3 * t_pil:.2f} ms/img)")
    print(f"tar write:   {n / t_wr:8.1f} img/s  ({1e3 * t_wr / n:.2f} ms/img)")
    verdict = "PASS" if rate >= TARGET else "MISS"
    print(f"total:       {rate:8.1f} img/s per core (CPU time)   target >= {TARGET:.0f}: {verdict} "
          f"(ratio {rate / TARGET:.2f}x)")
    print(f"wall clock:  {n / wall:8.1f} img/s (one process; lower than per-core when the machine is shared)")
    print(f"implied cores to feed one GPU at 400 img/s: {400 / rate:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
