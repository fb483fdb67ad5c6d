"""CPU benchmark: evaluation feature extraction per 1k images, Inception alone vs Inception + DINOv2 ViT-L/14 in the
one shared pass (`compute_activations`, the evaluation CLI's path: decode once, both networks per batch).

Random weights at the real architectures (Inception `random:0`; timm's `vit_large_patch14_dinov2`, random init,
given as dinov2-vit-l=FILE), 256-px images from an npz, no cache.

    python tests/benchmarks/bench_fd_dinov2.py [--num-images 32] [--batch 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    import timm
    import torch
    from safetensors.torch import save_file

    from evaluation.dinov2 import DinoV2Features
    from evaluation.features import compute_activations
    from evaluation.images import open_npz_images
    from evaluation.inception import InceptionFeatures
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        npz = Path(tmp) / "imgs.npz"
        np.savez(npz, arr_0=rng.integers(0, 256, (a.num_images, 256, 256, 3), dtype=np.uint8))
        torch.manual_seed(0)
        vit = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
        weights = Path(tmp) / "dinov2_vitl14.safetensors"
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
        del vit
        images = open_npz_images(npz)
        inception = InceptionFeatures("random:0")
        dino = DinoV2Features(f"dinov2-vit-l={weights}")
        compute_activations(open_npz_images(npz).limit(2), inception, dinov2=dino, batch_size=2, progress=False)
        t0 = time.perf_counter()
        compute_activations(images, inception, batch_size=a.batch, num_workers=2, progress=False)
        t_inc = time.perf_counter() - t0
        t0 = time.perf_counter()
        compute_activations(images, inception, dinov2=dino, batch_size=a.batch, num_workers=2, progress=False)
        t_both = time.perf_counter() - t0
    per_k = 1000 / a.num_images
    print(f"evaluation features, {a.num_images} images 256 px, batch {a.batch}, CPU fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"  Inception alone           : {t_inc * per_k / 60:7.1f} min per 1k images ({t_inc / a.num_images:.3f} s/img)")
    print(f"  Inception + DINOv2-L, 1 pass: {t_both * per_k / 60:7.1f} min per 1k images "
          f"({t_both / a.num_images:.3f} s/img; x{t_both / t_inc:.1f})")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
