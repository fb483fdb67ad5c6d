"""GPU sampling throughput: SiT-XL/2, 250-step SDE, CFG 1.8 on [0, 0.7], 256 px, one GPU, tf32 and bf16.

Times what the job does per batch (per-sample noise, the sampler, VAE decode to uint8); PNG encoding and disk
are left out (CPU work that overlaps across ranks). Weights are random: the FLOPs are those of the real model
(the SD-VAE architecture is built at random init unless sd-vae-ft-ema is in the HF cache). Targets: >= 2
samples/s per GPU in tf32 and >= 4 in bf16 (50k samples in < 50 min on 8 H100s).
Usage: python tests/benchmarks/gpu_sampler.py [--batch 128] [--device cpu --tiny]"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

TARGETS = {"tf32": 2.0, "bf16": 4.0, "fp32": 0.0}  # samples/s per GPU (issue 4)
SD_VAE_ARCH = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                   layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256)


def build_vae(tiny: bool, device: torch.device):
    from pipeline.encoders import load_vae
    if tiny:
        return load_vae("tiny-vae", device=device), "tiny-vae"
    try:
        return load_vae("sd-vae-ft-ema", device=device), "sd-vae-ft-ema"
    except Exception:  # noqa: BLE001 - offline: same architecture, random weights, same cost
        from diffusers import AutoencoderKL
        return AutoencoderKL(**SD_VAE_ARCH).to(device).eval().requires_grad_(False), "SD-VAE arch (random init)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="SiT-Debug/2, 4 steps, tiny-vae: checks the logic on CPU")
    p.add_argument("--batch", type=int, default=None, help="samples per batch (default 128; 4 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="SDE steps (default 250; 4 with --tiny)")
    p.add_argument("--precisions", default="tf32,bf16")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA (gpu_sampler needs one GPU; try --device cpu --tiny to check the logic)")
        return 0
    from trainer.models import SiT_models
    from trainer.sample import SampleConfig, Velocity, draw_inputs, set_precision
    from trainer.sample_io import decode
    from trainer.samplers import sample_sde
    torch.set_grad_enabled(False)
    name = "SiT-Debug/2" if args.tiny else "SiT-XL/2"
    batch = args.batch or (4 if args.tiny else 128)
    steps = args.steps or (4 if args.tiny else 250)
    torch.manual_seed(0)
    model = SiT_models[name](input_size=32, in_channels=4, num_classes=1000, z_dims=[768])
    model.projectors = torch.nn.ModuleList()  # as the job does: projectors only feed the training loss
    model = model.to(device).eval()
    vae, vae_name = build_vae(args.tiny, device)
    cfg = SampleConfig(ckpt="-", out="-", seed=0)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name} on {dev_name}, 256 px, batch {batch}, SDE {steps} steps, CFG 1.8 on [0, 0.7], VAE {vae_name}")

    def run(n_steps: int, fn) -> None:
        noise, y, gens = draw_inputs(cfg, range(batch), (4, 32, 32), 1000, None)
        z = sample_sde(fn, noise.to(device), y.to(device), steps=n_steps, cfg_scale=1.8, guidance_low=0.0,
                       guidance_high=0.7, generator=gens, null_class=1000)
        decode(vae, z, 0.18215, 0.0)  # ends with a device->host copy: a sync
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ok = True
    for prec in [s for s in args.precisions.split(",") if s]:
        set_precision(prec)
        fn = Velocity(model, device, prec)
        run(3, fn)  # warm-up: kernels, allocator, autotuning
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        run(steps, fn)
        dt = time.perf_counter() - t
        rate = batch / dt
        target = TARGETS.get(prec, 0.0) if not args.tiny else 0.0
        mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        verdict = "" if args.tiny else ("  OK" if rate >= target else f"  BELOW target {target}")
        ok &= rate >= target
        print(f"  {prec:5s}: {rate:7.3f} samples/s per GPU ({dt:.1f} s for {batch}; "
              f"{dt / steps * 1e3:.1f} ms/step{mem}){verdict}"
              + ("" if args.tiny else f"  -> 50k on 8 GPUs: {50_000 / (8 * rate) / 60:.0f} min"))
    print("all targets met" if ok else "some targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
