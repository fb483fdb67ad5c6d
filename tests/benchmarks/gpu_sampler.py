"""GPU sampling throughput: SiT-XL/2, 250-step SDE, CFG 1.8 on [0, 0.7], 256 px, one GPU, tf32 and bf16.

Runs what the job runs per batch: per-sample noise, `trainer.sample.Velocity` (compiled on CUDA; bf16 weights
cast once), `sample_sde`, and the VAE decode to uint8. To fit the one-call time budget it times a grid of
`--timed-steps` SDE steps (the same share of guided steps as 250) after a warm-up that compiles both batch shapes,
and scales to 250 steps: samples/s = batch / (250/S x t_steps + t_decode). PNG encoding and disk are left out.
Weights are random (the FLOPs are the real model's). Targets: >= 2 samples/s (tf32), >= 4 (bf16) per GPU.

    python tests/benchmarks/gpu_sampler.py [--batch 128] [--json out.json]
    python tests/benchmarks/gpu_sampler.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

TARGETS = {"tf32": 2.0, "bf16": 4.0, "fp32": 0.0}  # samples/s per GPU (issue 11)
SD_VAE_ARCH = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                   layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256)


def build_vae(tiny: bool, device: torch.device):
    from pipeline.encoders import load_vae
    if tiny:
        return load_vae("tiny-vae", device=device), "tiny-vae"
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(**SD_VAE_ARCH).to(device).eval().requires_grad_(False), "SD-VAE arch (random init)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="SiT-Debug/2, 4 steps, tiny-vae: checks the logic on CPU")
    p.add_argument("--batch", type=int, default=None, help="samples per batch (default 128; 4 with --tiny)")
    p.add_argument("--steps", type=int, default=250, help="the SDE steps reported (default 250)")
    p.add_argument("--timed-steps", type=int, default=None, help="SDE steps actually timed (default 25; 4 tiny)")
    p.add_argument("--precisions", default="tf32,bf16")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA (gpu_sampler needs one GPU; try --device cpu --tiny to check the logic)")
        return 0
    from trainer.models import SiT_models
    from trainer.sampling.job import SampleConfig, Velocity, draw_inputs, set_precision
    from trainer.sampling.output import decode
    from trainer.samplers import sample_sde
    torch.set_grad_enabled(False)
    name = "SiT-Debug/2" if args.tiny else "SiT-XL/2"
    batch = args.batch or (4 if args.tiny else 128)
    timed = args.timed_steps or (4 if args.tiny else 25)
    torch.manual_seed(0)
    base = SiT_models[name](input_size=32, in_channels=4, num_classes=1000, z_dims=[768])
    base.projectors = torch.nn.ModuleList()  # as the job does: projectors only feed the training loss
    base = base.eval()
    vae, vae_name = build_vae(args.tiny, device)
    cfg = SampleConfig(ckpt="-", out="-", seed=0)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name} on {dev_name}, 256 px, batch {batch}, SDE {args.steps} steps (timed {timed}), CFG 1.8 on "
          f"[0, 0.7], VAE {vae_name}", flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn, n_steps: int) -> tuple[float, float]:
        noise, y, gens = draw_inputs(cfg, range(batch), (4, 32, 32), 1000, None)
        sync()
        t0 = time.perf_counter()
        z = sample_sde(fn, noise.to(device), y.to(device), steps=n_steps, cfg_scale=1.8, guidance_low=0.0,
                       guidance_high=0.7, generator=gens, null_class=1000)
        sync()
        t1 = time.perf_counter()
        decode(vae, z, 0.18215, 0.0)  # ends with a device->host copy
        sync()
        return t1 - t0, time.perf_counter() - t1

    rates, res = {}, {}
    for prec in [s for s in args.precisions.split(",") if s]:
        set_precision(prec)
        fn = Velocity(copy.deepcopy(base).to(device), device, prec)  # bf16 casts its own copy once
        run(fn, timed)  # warm-up: compiles the plain and the CFG-doubled batch, autotunes, fills the allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_steps, t_dec = run(fn, timed)
        total = t_steps * args.steps / timed + t_dec
        rates[prec] = batch / total
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        res[prec] = {"ms_per_step": 1e3 * t_steps / timed, "decode_s": t_dec, "peak_gib": peak}
        target = 0.0 if args.tiny else TARGETS.get(prec, 0.0)
        print(f"  {prec:5s}: {rates[prec]:7.3f} samples/s per GPU ({1e3 * t_steps / timed:.1f} ms/step, decode "
              f"{t_dec:.2f} s{'' if peak is None else f', peak {peak:.1f} GiB'})"
              + ("" if args.tiny else ("  OK" if rates[prec] >= target else f"  BELOW target {target}")), flush=True)
        del fn
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "gpu_sampler", "device": dev_name, "model": name,
                                               "batch": batch, "steps": args.steps, "timed_steps": timed,
                                               "compiled": device.type == "cuda", "samples_per_s": rates,
                                               "detail": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
