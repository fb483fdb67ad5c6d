"""CPU benchmark: REPA step with precomputed features vs. with an online DINOv2-B; loader vs. raw read.

    python tests/benchmarks/bench_trainer.py [--model SiT-B/2] [--batch 8] [--samples 256]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from helpers import make_features_manifest  # noqa: E402

from manifests import load_manifest  # noqa: E402
from trainer.data.indexed import FeatureBatches, StepSampler, build_index, make_loader, needed_exts, resolve_fields  # noqa: E402
from trainer.models import SiT_models  # noqa: E402
from trainer.objectives.interpolant import repa_loss  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2 preprocessing


def step_time(model, opt, x, y, zs) -> float:
    """Seconds for one optimiser step of the trainer's loss on precomputed targets."""
    best = float("inf")
    for _ in range(1):
        t0 = time.perf_counter()
        out = repa_loss(model, x, y, zs)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - t0)
    return best


def encoder_time(encoder, images, reps: int) -> float:
    """Seconds for the online DINOv2-B targets of one batch (preprocessing + forward, no grad)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            im = images.float().div(255)  # (N, 3, 256, 256)
            im = (im - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            im = F.interpolate(im, size=224, mode="bicubic", align_corners=False)
            encoder.forward_features(im)[:, encoder.num_prefix_tokens:]  # (N, 256, 768)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_step(name: str, batch: int, reps: int) -> None:
    import timm
    torch.manual_seed(0)
    model = SiT_models[name](num_classes=1000, z_dims=[768]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,))
    zs = [torch.randn(batch, 256, 768, dtype=torch.float16).float()]
    encoder = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224).eval()
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    step_time(model, opt, x[:1], y[:1], [zs[0][:1]])  # warm-up (allocator, kernels) at batch 1
    # Interleaved, best of `reps`: the machine is shared, so a single timing is noisy.
    t_pre, t_enc = float("inf"), float("inf")
    for _ in range(reps):
        t_pre = min(t_pre, step_time(model, opt, x, y, zs))
        t_enc = min(t_enc, encoder_time(encoder, images, 1))
    t_onl = t_pre + t_enc  # what the official loop does every step: the encoder forward, then the same step
    print(f"trainer step, {name}, batch {batch}, CPU fp32, {torch.get_num_threads()} threads, best of {reps}")
    print(f"  precomputed features : {batch / t_pre:8.2f} img/s  ({t_pre:.2f} s/step)")
    print(f"  + online DINOv2-B    : {batch / t_onl:8.2f} img/s  ({t_onl:.2f} s/step; encoder forward "
          f"{t_enc:.2f} s of it)")
    print(f"  speed-up from precomputing: {t_onl / t_pre:.2f}x")


def bench_loader(samples: int, workers: int, micro: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        make_features_manifest(tmp, num=samples, classes=10, shard_size=128, encoders={"dinov2-vit-b": 768})
        m = load_manifest(tmp)
        spec = resolve_fields(m, None, 2, False)
        paths = m.shard_paths()
        total = sum(p.stat().st_size for p in paths)
        for p in paths:  # warm the page cache
            Path(p).read_bytes()
        t0 = time.perf_counter()
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.read(1 << 22):
                    pass
        raw = time.perf_counter() - t0
        index = build_index(m, needed_exts(spec, False), cache_dir=Path(tmp) / "index")
        ds = FeatureBatches(index, spec, seed=0, hflip=False)
        steps = samples // micro
        epochs = 4  # a window long enough to average out worker scheduling on a shared machine
        loader = make_loader(ds, StepSampler(len(index), micro, 0, 1, micro, 0, 0, steps * (epochs + 2)), workers,
                             pin=False)
        it = iter(loader)
        for _ in range(steps):  # one epoch to start the workers and warm up
            next(it)
        t0 = time.perf_counter()
        for _ in range(steps * epochs):
            next(it)
        took = (time.perf_counter() - t0) / epochs
        del it
        raw_sps, load_sps = samples / raw, samples / took
        print(f"loader, {samples} samples of {total / samples / 1024:.0f} KiB (latent moments + DINOv2-B tokens fp16), "
              f"{workers} workers, batch {micro}, shuffled indexed reads")
        print(f"  raw sequential read  : {raw_sps:10.0f} samples/s ({total / raw / 2**30:.2f} GiB/s)")
        print(f"  trainer loader       : {load_sps:10.0f} samples/s ({load_sps / raw_sps:.0%} of raw; target >= 50%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--loader-batch", type=int, default=64, help="per-GPU batch the loader serves")
    p.add_argument("--skip-step", action="store_true")
    a = p.parse_args()
    bench_loader(a.samples, a.workers, a.loader_batch)
    if not a.skip_step:
        bench_step(a.model, a.batch, a.reps)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
