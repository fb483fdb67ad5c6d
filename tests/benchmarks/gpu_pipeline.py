"""GPU benchmark of the extract actor: the real `ShardEncoder` with the full-size SD-VAE and DINOv2-B
architectures (random weights, the real FLOPs) at 256 px, in REPA's default numerics and in `--precision fast`.

It times `ShardEncoder._encode` (pinned host->device copy, VAE moments, DINOv2-B tokens, pinned device->host copy
to numpy; torch.compile on CUDA, as the actor does) and reports img/s per GPU for each numerics, plus the deviation
of fast from default on the same images: the VAE mean's error in units of the posterior std, and the token cosine.
Target: >= 400 img/s with --precision fast on one H100.

    python tests/benchmarks/gpu_pipeline.py [--batch-size 256] [--json out.json]
    python tests/benchmarks/gpu_pipeline.py --device cpu --tiny                 # logic check, tiny presets
    python tests/benchmarks/gpu_pipeline.py --device cpu --deviation-only --batch-size 2   # full-size, on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TARGET = 400.0  # img/s per H100 with --precision fast (issue 11)
# diffusers' AutoencoderKL config of stabilityai/sd-vae-ft-ema (the SD 1.x VAE), random weights.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256,
                     scaling_factor=0.18215)


def build_actor(device, tiny: bool, resolution: int, batch_size: int, precision: str, compile_: bool):
    """A real ShardEncoder holding benchmark models (built here: no weights to download), set up as the actor is."""
    import timm
    import torch
    from diffusers import AutoencoderKL

    from pipeline.encoders import ENCODERS, Encoder, load_encoder, load_vae, vae_moments
    from manifests.codecs import get_codec
    from pipeline.config import ExtractConfig
    from pipeline.worker import ShardEncoder

    names = ["tiny-dinov2"] if tiny else ["dinov2-vit-b"]
    actor = ShardEncoder.__new__(ShardEncoder)  # skip __init__'s hub loading; the same numerics setup and _encode
    actor.cfg = ExtractConfig(source="-", out="-", resolution=resolution, encoders=names, batch_size=batch_size,
                              precision=precision)
    actor.torch, actor.device, actor.vae_moments = torch, device, vae_moments
    torch.manual_seed(0)
    if tiny:
        actor.vae = load_vae("tiny-vae", device=device)
        actor.encoders = [load_encoder(n, resolution, device=device) for n in names]
    else:
        actor.vae = AutoencoderKL(**SD_VAE_CONFIG).to(device).eval().requires_grad_(False)
        actor.encoders = []
        for n in names:
            spec = ENCODERS[n]
            model = timm.create_model(spec.arch, pretrained=False, num_classes=0,
                                      img_size=spec.input_at_256 * resolution // 256)
            actor.encoders.append(Encoder(spec, model.to(device).eval().requires_grad_(False), resolution, "random"))
    actor._setup_numerics(compile_=compile_)
    actor.codec = get_codec(actor.cfg.feature_dtype)  # the product's default token codec, as __init__ sets it
    r8 = resolution // 8
    actor.fields = {"latent": {"shape": [8, r8, r8]}, **{e.name: {"shape": [e.grid[0] * e.grid[1], e.dim]}
                                                          for e in actor.encoders}}
    return actor


def deviation(fast: dict, default: dict, name: str) -> dict:
    """fast vs default: |d mean| / std of the posterior (mean, p99, max) and the per-token cosine (mean, min)."""
    import numpy as np
    c = default["latent"].shape[1] // 2
    mu, std = default["latent"][:, :c].astype(np.float64), default["latent"][:, c:].astype(np.float64)
    err = np.abs(fast["latent"][:, :c] - mu) / std
    a, b = default[name].astype(np.float64), fast[name].astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"vae_mean_err_over_std": {"mean": float(err.mean()), "p99": float(np.quantile(err, 0.99)),
                                      "max": float(err.max())},
            "token_cosine": {"mean": float(cos.mean()), "min": float(cos.min())}, "images": int(len(mu))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny presets (CPU logic check), not the full-size models")
    ap.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 256; 4 tiny)")
    ap.add_argument("--shard-images", type=int, default=None, help="images per timed shard (default 1024; 8 tiny)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true", help="eager, even on CUDA")
    ap.add_argument("--deviation-only", action="store_true", help="only the fast-vs-default deviation")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    import numpy as np
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA (gpu_pipeline needs a GPU; use --device cpu --tiny for a logic check)")
        return 0
    device = torch.device(args.device)
    batch = args.batch_size or (4 if args.tiny else 256)
    n = args.shard_images or (8 if args.tiny else 1024)
    r = args.resolution
    crops = np.random.default_rng(0).integers(0, 256, size=(n, r, r, 3), dtype=np.uint8)  # (n, R, R, 3)
    compile_ = device.type == "cuda" and not args.no_compile

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    from manifests.codecs import get_codec
    rates, outs = {}, {}
    for prec in ("default", "fast"):
        actor = build_actor(device, args.tiny, r, batch, prec, compile_)
        codec, actor.codec = actor.codec, get_codec("float32")  # the deviation sample: the encoders' own output
        outs[prec] = actor._encode(crops[:batch])  # warm-up (cudnn autotune, compile); also the deviation sample
        actor.codec = codec  # timed below with the default codec, as extraction runs
        for name, spec in actor.fields.items():
            assert list(outs[prec][name].shape[1:]) == spec["shape"], (name, outs[prec][name].shape, spec["shape"])
        if args.deviation_only:
            continue
        sync()
        t0 = time.perf_counter()
        actor._encode(crops)
        sync()
        rates[prec] = n / (time.perf_counter() - t0)
        print(f"  {prec:7s}: {rates[prec]:8.1f} img/s", flush=True)
        del actor
    enc = "tiny-dinov2" if args.tiny else "dinov2-vit-b"
    dev = deviation(outs["fast"], outs["default"], enc)
    what = "tiny presets" if args.tiny else "SD-VAE arch + DINOv2-B (random weights)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{what} at {r} px, batch {batch}, {'compiled' if compile_ else 'eager'}, on {name}")
    if rates:
        print(f"extract actor, fast: {rates['fast']:.1f} img/s (target {TARGET:.0f}); default: {rates['default']:.1f}")
    print(f"fast vs default on {dev['images']} images: VAE |d mean|/std mean {dev['vae_mean_err_over_std']['mean']:.3g}"
          f", p99 {dev['vae_mean_err_over_std']['p99']:.3g}, max {dev['vae_mean_err_over_std']['max']:.3g}; token "
          f"cosine mean {dev['token_cosine']['mean']:.6f}, min {dev['token_cosine']['min']:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "gpu_pipeline", "device": name, "models": what,
                                               "batch": batch, "compiled": compile_, "img_per_s": rates,
                                               "fast_vs_default": dev}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    sys.exit(main())
