"""GPU benchmark (one H100): SiT-XL/2 + REPA step with precomputed DINOv2-B features, fp16.

Finds the largest per-GPU batch that fits in one pass, then reports img/s, peak memory and MFU, with and without
torch.compile, plus the online-encoder baseline (DINOv2-B forward every step, as the official code does), and a
short end-to-end `python -m trainer train` run on a synthetic manifest (loader, pinned memory, checkpoints).

    python tests/benchmarks/gpu_trainer.py                 # on a GPU machine
    python tests/benchmarks/gpu_trainer.py --device cpu --tiny   # logic check on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from trainer.models import SiT_models  # noqa: E402
from trainer.transport import repa_loss  # noqa: E402

H100_PEAK = 989e12  # H100 SXM dense bf16/fp16 tensor-core peak, FLOP/s (NVIDIA datasheet)
PAPER_IMG_S = 170  # paper: 5.4 it/s at batch 256 on 8xH100 with online DINOv2 (DESIGN §7)
FORMULA = ("FLOPs/img (train) = 3 x fwd; fwd = T*(2*12*L*D^2 + 2*C*p^2*D + 2*D*p^2*C + 2*(D*P + P*P + P*Z)) "
           "+ L*4*T^2*D + 2*(L*6 + 2)*D^2 + 2*256*D + 2*D*D")


def flops_per_image(model, proj_dim: int = 2048) -> float:
    """Analytic training FLOPs per image: matmuls only (2 per MAC), backward = 2x forward."""
    d = model.pos_embed.shape[-1]
    t = model.pos_embed.shape[1]
    depth = len(model.blocks)
    p, c = model.patch_size, model.in_channels
    z = sum(model.z_dims)
    n_proj = len(model.z_dims)
    per_token = 2 * 12 * depth * d * d + 2 * c * p * p * d + 2 * d * p * p * c
    per_token += n_proj * 2 * (d * proj_dim + proj_dim * proj_dim) + 2 * proj_dim * z
    attn = depth * 4 * t * t * d  # QK^T and AV
    per_image = 2 * (depth * 6 + 2) * d * d + 2 * 256 * d + 2 * d * d  # adaLN, final adaLN, t-embedder MLP
    return 3.0 * (t * per_token + attn + per_image)


class Step:
    """The trainer's optimiser step (autocast, GradScaler, clip after unscale, fused AdamW, EMA lerp)."""

    def __init__(self, model, device, compile_: bool, precision: str = "fp16"):
        import copy
        self.model, self.device = model, device
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.net = torch.compile(model) if compile_ else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        self.amp = lambda: torch.autocast(device.type, dtype=dtype)

    def __call__(self, x, y, zs):
        out = repa_loss(self.net, x, y, zs, amp=self.amp)
        self.scaler.scale(out.total).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1e-4)
        return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inputs(batch, device, z_dim=768, num_classes=1000):
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    zs = [torch.randn(batch, 256, z_dim, device=device, dtype=torch.float16).float()]
    return x, y, zs


def online_targets(encoder, images, device):
    """What REPA does each step: uint8 256px -> /255, ImageNet-normalise, bicubic to 224, DINOv2-B tokens."""
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        im = (images.float() / 255 - mean) / std
        im = F.interpolate(im, size=224, mode="bicubic", align_corners=False)
        return [encoder.forward_features(im)[:, encoder.num_prefix_tokens:].float()]


def measure(step: Step, batch: int, device, warmup: int, iters: int, encoder=None) -> dict:
    x, y, zs = inputs(batch, device, num_classes=step.model.num_classes)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device) if encoder else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + iters):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        targets = online_targets(encoder, images, device) if encoder is not None else zs
        step(x, y, targets)
    sync(device)
    dt = (time.perf_counter() - t0) / iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"batch": batch, "s_per_step": dt, "img_s": batch / dt, "peak_gib": peak}


def largest_batch(name, device, candidates, compile_) -> int:
    """The largest per-GPU batch (<= global 256) whose whole step fits in memory in one pass."""
    for b in candidates:
        model = SiT_models[name](num_classes=1000, z_dims=[768]).to(device)
        step = Step(model, device, compile_)
        try:
            measure(step, b, device, warmup=1, iters=1)
            return b
        except torch.OutOfMemoryError:
            pass
        finally:
            del step, model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    raise SystemExit("no batch size fits")


def e2e(device, tiny: bool) -> None:
    """A real `python -m trainer train` run on a synthetic DINOv2-B-shaped manifest."""
    from helpers import make_features_manifest
    with tempfile.TemporaryDirectory() as tmp:
        n = 64 if tiny else 1024
        make_features_manifest(Path(tmp) / "feat", num=n, classes=10, shard_size=256,
                               encoders={"dinov2-vit-b": 768})
        model, batch, steps = ("SiT-Debug/2", 8, 6) if tiny else ("SiT-XL/2", 128, 40)
        cmd = [sys.executable, "-m", "trainer", "train", "--manifest", f"{tmp}/feat", "--run-dir", f"{tmp}/run",
               "--model", model, "--batch-size", str(batch), "--steps", str(steps), "--ckpt-every", str(steps),
               "--log-every", str(max(steps // 4, 1)), "--num-workers", "2" if tiny else "8",
               "--precision", "fp32" if device.type == "cpu" else "fp16"]
        if tiny:
            cmd += ["--enc-depth", "2"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-3000:])
            raise SystemExit(f"end-to-end trainer run failed ({p.returncode})")
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "stats.jsonl").read_text().splitlines()]
        last = rows[-1]
        print(f"end-to-end `python -m trainer train` ({model}, batch {batch}, {steps} steps, {time.perf_counter() - t0:.0f}"
              f" s incl. startup and checkpoint): last interval {last['img_per_s']:.1f} img/s, data wait "
              f"{last['data_wait_s']:.2f} s, loss {last['loss']:.4f}, skipped {last['skipped']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="SiT-Debug/2 and tiny batches (CPU logic check)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-online", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_trainer: skipped: no CUDA")
        return
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    name = "SiT-Debug/2" if a.tiny else "SiT-XL/2"
    kw = {"encoder_depth": 2} if a.tiny else {}
    candidates = [4, 2] if a.tiny else [256, 192, 160, 128, 96, 64, 32]
    iters, warmup = (2, 1) if a.tiny else (a.iters, 3)
    probe = SiT_models[name](num_classes=1000, z_dims=[768], **kw)
    fl = flops_per_image(probe)
    del probe
    print(f"{name} + REPA (DINOv2-B, 768-d, 1 projector), fp16 autocast + GradScaler, fused AdamW, EMA")
    print(f"  {FORMULA}\n  = {fl / 1e9:.1f} GFLOP per image per training step")
    results = {}
    for comp in ([False] if a.no_compile else [False, True]):
        batch = largest_batch(name, device, candidates, comp) if not a.tiny else candidates[0]
        model = SiT_models[name](num_classes=1000, z_dims=[768], **kw).to(device)
        r = measure(Step(model, device, comp), batch, device, warmup=warmup + (2 if comp else 0), iters=iters)
        r["mfu"] = r["img_s"] * fl / H100_PEAK
        results["compile" if comp else "eager"] = r
        print(f"  {'compiled' if comp else 'eager   '}: batch {batch:4d}  {r['img_s']:8.1f} img/s  "
              f"peak {r['peak_gib']:.1f} GiB  MFU {r['mfu']:.1%} (of {H100_PEAK / 1e12:.0f} TFLOP/s)  "
              f"x{r['img_s'] / PAPER_IMG_S:.2f} the paper's ~{PAPER_IMG_S} img/s/GPU")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not a.no_online:
        import timm
        enc = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224).to(device).eval()
        batch = results["eager"]["batch"]
        while True:
            model = SiT_models[name](num_classes=1000, z_dims=[768], **kw).to(device)
            try:
                r = measure(Step(model, device, False), batch, device, warmup=warmup, iters=iters, encoder=enc)
                break
            except torch.OutOfMemoryError:
                del model
                torch.cuda.empty_cache()
                batch //= 2
        print(f"  online DINOv2-B baseline (eager): batch {batch:4d}  {r['img_s']:8.1f} img/s  "
              f"peak {r['peak_gib']:.1f} GiB; precomputed features are x{results['eager']['img_s'] / r['img_s']:.2f}")
        del model, enc
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not a.no_e2e:
        e2e(device, a.tiny)
    best = max(v["img_s"] for v in results.values())
    if not a.tiny:
        print(f"target >= 500 img/s and MFU >= 35%: best {best:.0f} img/s, "
              f"MFU {max(v['mfu'] for v in results.values()):.1%}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    main()
