"""CPU benchmark: one training step of DiT-B/2 + REPA (DDPM hybrid loss) against SiT-B/2 + REPA (interpolant), same
batch, same precomputed targets; and the DDPM bookkeeping alone (q_sample + loss terms) against the step.

    python tests/benchmarks/bench_families.py [--batch 8] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.models import DiT_models, SiT_models  # noqa: E402
from trainer.objectives.ddpm import base_diffusion, ddpm_repa_loss  # noqa: E402
from trainer.objectives.interpolant import repa_loss  # noqa: E402


def step(model, opt, loss_fn, x, y, zs, t) -> float:
    t0 = time.perf_counter()
    out = loss_fn(model, x, y, zs, t=t)
    out.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def bookkeeping(x, t) -> float:
    """The DDPM part of a DiT step without the network: q_sample and the hybrid loss terms on a fixed output."""
    d = base_diffusion()
    out = torch.randn(x.shape[0], 2 * x.shape[1], *x.shape[2:], requires_grad=True)
    t0 = time.perf_counter()
    ti = (t * d.num_timesteps).long().clamp(max=d.num_timesteps - 1)
    eps = torch.randn_like(x)
    x_t = d.q_sample(x, ti, eps)
    terms = d.loss_terms(out, x, x_t, ti, eps)
    terms["loss"].mean().backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(a.batch, 4, 32, 32), torch.randint(0, 1000, (a.batch,))
    zs = [torch.randn(a.batch, 256, 768)]
    t = torch.rand(a.batch)
    runs = {"SiT-B/2 + REPA": (SiT_models["SiT-B/2"](num_classes=1000, z_dims=[768]), repa_loss),
            "DiT-B/2 + REPA": (DiT_models["DiT-B/2"](num_classes=1000, z_dims=[768]), ddpm_repa_loss)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in runs.items()}
    for k, (m, fn) in runs.items():  # warm-up at batch 1
        step(m.train(), opts[k], fn, x[:1], y[:1], [zs[0][:1]], t[:1])
    best = {k: float("inf") for k in runs}
    for _ in range(a.reps):  # interleaved, best of reps: the machine is shared
        for k, (m, fn) in runs.items():
            best[k] = min(best[k], step(m, opts[k], fn, x, y, zs, t))
    book = min(bookkeeping(x, t) for _ in range(a.reps))
    print(f"training step, batch {a.batch}, CPU fp32, {torch.get_num_threads()} threads, best of {a.reps}")
    for k, s in best.items():
        print(f"  {k:16s}: {s:6.2f} s/step ({a.batch / s:6.2f} img/s)")
    sit, dit = best["SiT-B/2 + REPA"], best["DiT-B/2 + REPA"]
    print(f"  ratio DiT/SiT     : {dit / sit:.3f}")
    print(f"  DDPM bookkeeping  : {book * 1e3:.1f} ms/step ({book / dit:.2%} of the DiT step)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
