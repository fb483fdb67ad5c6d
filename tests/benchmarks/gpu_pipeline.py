"""GPU benchmark of the extract actor: full-size SD-VAE + DINOv2-B + SigLIP-B (random weights, same FLOPs) at 256 px.

It times the real actor code path (`ShardEncoder._encode`: host->device copy, bf16 autocast VAE moments and both
encoders' tokens, device->host copy to float16 numpy) and prints img/s per GPU.
Target: >= 400 img/s on one H100 (ImageNet-1k's 1,281,167 images in < 7 min on 8 GPUs).
Run: python tests/benchmarks/gpu_pipeline.py [--batch-size 256] [--compile]
     python tests/benchmarks/gpu_pipeline.py --device cpu --tiny      (logic check on CPU with the tiny presets)
Without CUDA (and without --device cpu) it prints 'skipped: no CUDA' and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

IMAGENET_TRAIN = 1_281_167
TARGET = 400.0  # img/s per H100 (issue #2)
# diffusers' AutoencoderKL config of stabilityai/sd-vae-ft-ema (the SD 1.x VAE), random weights.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256,
                     scaling_factor=0.18215)


def build_actor(device, tiny: bool, resolution: int, batch_size: int, compile_: bool):
    """A ShardEncoder holding the benchmark models (built here: no weights to download)."""
    import timm
    import torch
    from diffusers import AutoencoderKL

    from pipeline.encoders import ENCODERS, Encoder, load_encoder, load_vae, vae_moments
    from pipeline.worker import EncodeConfig, ShardEncoder

    names = ["tiny-dinov2", "tiny-siglip"] if tiny else ["dinov2-vit-b", "siglip-vit-b"]
    actor = ShardEncoder.__new__(ShardEncoder)  # skip __init__'s hub loading; same _encode path
    actor.cfg = EncodeConfig(out="-", fingerprint="-", resolution=resolution, encoders=names, batch_size=batch_size)
    actor.torch, actor.device, actor.vae_moments = torch, device, vae_moments
    actor.autocast = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if tiny:
        vae = load_vae("tiny-vae", device=device)
        encoders = [load_encoder(n, resolution, device=device) for n in names]
    else:
        vae = AutoencoderKL(**SD_VAE_CONFIG).to(device).eval().requires_grad_(False)
        encoders = []
        for n in names:
            spec = ENCODERS[n]
            model = timm.create_model(spec.arch, pretrained=False, num_classes=0,
                                      img_size=spec.input_at_256 * resolution // 256)
            encoders.append(Encoder(spec, model.to(device).eval().requires_grad_(False), resolution, "random"))
    vae = vae.to(memory_format=torch.channels_last)
    if compile_:
        vae.encoder = torch.compile(vae.encoder)
        for e in encoders:
            e.model = torch.compile(e.model)
    actor.vae, actor.encoders = vae, encoders
    r8 = resolution // 8
    actor.fields = {"latent": {"shape": [8, r8, r8]}, **{e.name: {"shape": [e.grid[0] * e.grid[1], e.dim]}
                                                          for e in encoders}}
    return actor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny presets (CPU logic check), not the full-size models")
    ap.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    ap.add_argument("--shard-images", type=int, default=1024, help="images per timed shard")
    ap.add_argument("--iters", type=int, default=3, help="timed shards")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="torch.compile the VAE encoder and the encoders")
    args = ap.parse_args()
    import numpy as np
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA (gpu_pipeline needs a GPU; use --device cpu --tiny for a logic check)")
        return 0
    device = torch.device(args.device)
    actor = build_actor(device, args.tiny, args.resolution, args.batch_size, args.compile)
    rng = np.random.default_rng(0)
    r = args.resolution
    crops = rng.integers(0, 256, size=(args.shard_images, r, r, 3), dtype=np.uint8)  # (n, R, R, 3) decoded crops

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = actor._encode(crops[: args.batch_size])  # warm-up: cudnn autotune, compile
    for name, spec in actor.fields.items():
        assert list(out[name].shape[1:]) == spec["shape"], (name, out[name].shape, spec["shape"])
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        actor._encode(crops)
    sync()
    dt = time.perf_counter() - t0
    rate = args.iters * args.shard_images / dt
    what = "tiny presets" if args.tiny else "sd-vae-ft-ema arch + dinov2-vit-b + siglip-vit-b (random weights)"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{what} at {r} px, batch {args.batch_size}, {'compiled' if args.compile else 'eager'}, on {dev}")
    print(f"extract actor: {rate:.1f} img/s per GPU (target {TARGET:.0f}: {'PASS' if rate >= TARGET else 'MISS'}, "
          f"ratio {rate / TARGET:.2f}x)")
    print(f"ImageNet-1k train on 8 such GPUs: {IMAGENET_TRAIN / (8 * rate) / 60:.1f} min")
    # Component split, to see which model dominates.
    from pipeline.encoders import vae_moments
    x = torch.from_numpy(crops[: args.batch_size]).to(device)
    parts = [("vae", lambda: vae_moments(actor.vae, x))] + [(e.name, (lambda e=e: e(x))) for e in actor.encoders]
    for name, fn in parts:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=actor.autocast):
            fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            sync()
        print(f"  {name:14s} {args.iters * args.batch_size / (time.perf_counter() - t0):9.1f} img/s alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
