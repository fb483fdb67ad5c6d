"""CPU benchmark of the token codecs: bytes per image, loader speed against raw reads, fidelity, latent moments.

    python tests/benchmarks/bench_codecs.py [--samples 512] [--workers 2] [--vit-images 8] [--parts loader,...]
    python tests/benchmarks/bench_codecs.py --parts latent --latent-manifest /data/in256   # real VAE moments

1. Bytes per image (latent moments + DINOv2-B tokens, 256x768) for each codec.
2. The trainer's loader (shuffled indexed reads, `--workers` processes) in samples/s for each codec, against a raw
   sequential read of the same shards, and the bytes each batch ships to the device.
3. Fidelity against the float32 tokens of the same images (tests/codec_fidelity.py): token cosine min/mean, relative
   error of the REPA cosine loss (fixed batch, fixed projector), CKNNA of pooled and of per-token features.
4. A stress case with outlier channels, showing where per-token absmax int8 starts to lose.
5. Latent moments: could they be stored in float16/bfloat16 with the sampled latent's error under 1% of the posterior
   std on every element?
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from helpers import make_features_manifest  # noqa: E402

from manifests import load_manifest  # noqa: E402
from trainer.data.indexed import FeatureBatches, StepSampler, build_index, make_loader, needed_exts, resolve_fields  # noqa: E402

CODECS = ("float16", "int8", "float8_e4m3")


def raw_read(paths: list[Path]) -> float:
    """Seconds for a sequential read of the shards from the page cache (4 MiB reads, as bench_trainer does)."""
    for p in paths:  # warm the page cache
        Path(p).read_bytes()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.read(1 << 22):
                    pass
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_costs(root: Path, micro: int, paths: list[Path]) -> tuple[float, float]:
    """(CPU seconds per sample of the loader's reads in this process, of a raw sequential read of the shards).

    CPU time, unlike wall time, barely moves when other jobs share the cores, so it compares codecs fairly there.
    """
    m = load_manifest(root)
    spec = resolve_fields(m, None, 2, False)
    ds = FeatureBatches(build_index(m, needed_exts(spec, False), cache_dir=root / "index"), spec, seed=0, hflip=False)
    ds.ring_size = 4
    items = list(StepSampler(len(ds.index), micro, 0, 1, micro, 0, 0, 3 * len(ds.index) // micro))
    for it in items[:2]:
        ds[it]  # allocate the ring
    t0 = time.process_time()
    for it in items[2:]:
        ds[it]
    load = (time.process_time() - t0) / (len(items[2:]) * micro)
    t0 = time.process_time()
    for _ in range(3):
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.read(1 << 22):
                    pass
    raw = (time.process_time() - t0) / (3 * len(ds.index))
    return load, raw


def loader_rate(root: Path, workers: int, micro: int, epochs: int = 16) -> tuple[float, int]:
    """(samples/s of the trainer's loader over `epochs` epochs after two warm-up epochs, bytes shipped per sample).

    An epoch of 512 samples takes ~40 ms, so 16 of them keep scheduler noise out of the figure."""
    m = load_manifest(root)
    spec = resolve_fields(m, None, 2, False)
    index = build_index(m, needed_exts(spec, False), cache_dir=root / "index")
    ds = FeatureBatches(index, spec, seed=0, hflip=False)
    steps = len(index) // micro
    loader = make_loader(ds, StepSampler(len(index), micro, 0, 1, micro, 0, 0, steps * (epochs + 3)), workers,
                         pin=False)
    it = iter(loader)
    for _ in range(2 * steps):
        b = next(it)
    shipped = sum(t.nbytes for t in [b["x"], *b["zs"], *[s for s in b["zscales"] if s is not None]]) // micro
    t0 = time.perf_counter()
    for _ in range(steps * epochs):
        next(it)
    took = (time.perf_counter() - t0) / epochs
    del it
    return len(index) / took, shipped


def bench_loader(samples: int, workers: int, micro: int, rounds: int) -> None:
    print(f"== bytes and loader: {samples} samples, latent moments 8x32x32 fp32 + DINOv2-B tokens 256x768, "
          f"{workers} workers, batch {micro}, shuffled indexed reads, best of {rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for c in CODECS:
            roots[c] = Path(tmp) / c
            make_features_manifest(roots[c], num=samples, classes=10, shard_size=128, codec=c,
                                   encoders={"dinov2-vit-b": 768})
        res = {c: {"raw": 0.0, "loader": 0.0} for c in CODECS}
        for _ in range(rounds):  # interleaved rounds: the machine is shared, keep the best of each
            for c in CODECS:
                paths = load_manifest(roots[c]).shard_paths()
                res[c]["bytes"] = sum(p.stat().st_size for p in paths) / samples
                res[c]["raw"] = max(res[c]["raw"], samples / raw_read(paths))
                rate, shipped = loader_rate(roots[c], workers, micro)
                res[c]["loader"], res[c]["shipped"] = max(res[c]["loader"], rate), shipped
                load_cpu, raw_cpu = cpu_costs(roots[c], micro, paths)
                res[c]["load_cpu"] = min(res[c].get("load_cpu", 1e9), load_cpu)
                res[c]["raw_cpu"] = min(res[c].get("raw_cpu", 1e9), raw_cpu)
        f16 = res["float16"]
        print(f"  {'codec':12s} {'bytes/img':>10s} {'shipped/img':>12s} {'raw read/s':>11s} {'loader/s':>9s} "
              f"{'of raw':>7s} {'vs fp16':>8s}")
        for c in CODECS:
            r = res[c]
            print(f"  {c:12s} {r['bytes'] / 1024:8.1f}KB {r['shipped'] / 1024:10.1f}KB {r['raw']:11.0f} "
                  f"{r['loader']:9.0f} {r['loader'] / r['raw']:6.0%} {r['loader'] / f16['loader']:7.2f}x")
        print("  CPU time per sample (one process, robust to other jobs on the cores):")
        for c in CODECS:
            r = res[c]
            print(f"  {c:12s} loader {r['load_cpu'] * 1e6:7.0f} us, raw read {r['raw_cpu'] * 1e6:6.0f} us "
                  f"(raw/loader {r['raw_cpu'] / r['load_cpu']:.0%}); fp16 loader / this loader "
                  f"{f16['load_cpu'] / r['load_cpu']:.2f}x")
        i8 = res["int8"]
        print(f"  goals: int8 loader >= 1.5x fp16 loader: {i8['loader'] / f16['loader']:.2f}x "
              f"({'met' if i8['loader'] >= 1.5 * f16['loader'] else 'NOT met'}); int8 loader >= 60% of raw read of "
              f"its shards: {i8['loader'] / i8['raw']:.0%} ({'met' if i8['loader'] >= 0.6 * i8['raw'] else 'NOT met'})")


def bench_fidelity(tiny_images: int, vit_images: int) -> None:
    from codec_fidelity import encoder_tokens, fidelity, outlier_tokens, synth_crops
    print("== fidelity against float32 tokens of the same images (random-init encoders: real DINOv2 weights are "
          "not available offline)")
    crops = synth_crops(max(tiny_images, vit_images))
    sets = [("tiny-dinov2 (pipeline preset)", "tiny-dinov2", tiny_images)]
    if vit_images:
        sets.append(("ViT-B/14 DINOv2 arch, random init", "vit-b-random", vit_images))
    for label, enc, n in sets:
        t0 = time.perf_counter()
        ref = encoder_tokens(crops[:n], enc)
        rms = ref.pow(2).mean(-1).sqrt()
        ratio = (ref.abs().amax(-1) / rms).max().item()
        print(f"  {label}: {n} images, tokens {tuple(ref.shape[1:])}, max per-token absmax/rms {ratio:.1f} "
              f"({time.perf_counter() - t0:.0f}s to encode)")
        _fid_table(ref, CODECS)
    print("  stress case: Gaussian tokens (32 x 256 x 768) with 2 outlier channels k times larger than the rest, int8")
    for k in (1, 10, 30, 100):
        f = fidelity(outlier_tokens(32, 256, 768, float(k)), "int8", token_cknna=False)
        print(f"    k={k:3d}: cos min {f['cos_min']:.5f} mean {f['cos_mean']:.5f}, REPA loss rel err "
              f"{f['loss_rel_err']:.1e}, CKNNA pooled {f['cknna_pooled']:.4f}")


def _fid_table(ref: torch.Tensor, codecs) -> None:
    from codec_fidelity import fidelity
    print(f"    {'codec':12s} {'cos min':>9s} {'cos mean':>9s} {'loss fp32':>10s} {'loss codec':>11s} "
          f"{'rel err':>8s} {'CKNNA pooled':>13s} {'CKNNA tokens':>13s}")
    for c in codecs:
        f = fidelity(ref, c)
        print(f"    {c:12s} {f['cos_min']:9.6f} {f['cos_mean']:9.6f} {f['loss_fp32']:10.6f} {f['loss_codec']:11.6f} "
              f"{f['loss_rel_err']:8.1e} {f['cknna_pooled']:13.4f} {f['cknna_tokens']:13.4f}")


def bench_latent(images: int, manifest: str | None) -> None:
    """Worst element of |z16 - z32| / std for z = mean + std*eps with the moments rounded to float16/bfloat16."""
    print("== latent moments: sampled-latent error from storing the moments below float32, in units of the posterior "
          "std (bar: < 1% on every element)")
    if manifest:
        from manifests.shards import iter_shard
        m = load_manifest(manifest)
        from itertools import islice
        mom = np.stack([s["latent.npy"] for s in islice((s for p in m.shard_paths() for s in iter_shard(p)), images)])
        label = f"{m.path}"
    else:
        from codec_fidelity import synth_crops
        from pipeline.encoders import load_vae, vae_moments
        vae = load_vae("tiny-vae")
        with torch.no_grad():
            mom = vae_moments(vae, torch.from_numpy(synth_crops(images))).float().numpy()
        label = "tiny-vae (random init) on the synthetic images"
    mom = torch.from_numpy(mom).double()  # (N, 2C, H, W)
    c = mom.shape[1] // 2
    mean, std = mom[:, :c], mom[:, c:]
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = mean + std * eps
    ratio = (mean.abs() / std).flatten()
    print(f"  {label}: {len(mom)} images; |mean|/std median {ratio.median():.3g}, max {ratio.max():.3g}")
    for dt in (torch.float16, torch.bfloat16):
        m2, s2 = mean.to(dt).double(), std.to(dt).double()
        err = ((m2 + s2 * eps) - z).abs() / std  # (N, C, H, W)
        print(f"  {str(dt).split('.')[-1]:9s}: worst element {err.max():.2e} of std, "
              f"{(err > 0.01).double().mean():.2%} of elements over 1% -> "
              f"{'OK' if err.max() < 0.01 else 'keep float32'}")
    ulp = 2.0 ** -11  # float16 half-ulp relative: the mean term dominates, so fp16 needs |mean|/std < ~0.01/ulp
    print(f"  float16 keeps 1% only where |mean|/std < {0.01 / ulp:.0f}; bfloat16 where < {0.01 / 2 ** -8:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tiny-images", type=int, default=64)
    p.add_argument("--vit-images", type=int, default=8, help="images through the random-init ViT-B (0: skip)")
    p.add_argument("--latent-manifest", default=None, help="run the latent study on this features set's moments "
                                                            "(default: tiny-vae on synthetic images)")
    p.add_argument("--latent-images", type=int, default=32)
    p.add_argument("--parts", default="loader,fidelity,latent", help="comma list of loader, fidelity, latent")
    a = p.parse_args()
    parts = set(a.parts.split(","))
    if "loader" in parts:
        bench_loader(a.samples, a.workers, a.loader_batch, a.rounds)
    if "fidelity" in parts:
        bench_fidelity(a.tiny_images, a.vit_images)
    if "latent" in parts:
        bench_latent(a.latent_images, a.latent_manifest)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
