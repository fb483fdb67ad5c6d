"""CKNNA at the paper's size (10k images, SiT-XL/2 width 1152 vs DINOv2-B 768) on CPU; the sparse top-k path
against the dense n×n reference at a size the reference can hold. Usage: python tests/benchmarks/bench_align.py"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from evaluation.align.metric import cknna, cknna_dense, cknna_graphs, graph_self_hsic, knn_graph  # noqa: E402


def features(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related feature sets: a shared 64-d signal seen through different maps, plus noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 64, generator=g)
    a = z @ torch.randn(64, 1152, generator=g) + 4 * torch.randn(n, 1152, generator=g)
    b = z @ torch.randn(64, 768, generator=g) + 4 * torch.randn(n, 768, generator=g)
    return a, b


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dense-n", type=int, default=2000)
    p.add_argument("--layers", type=int, default=3, help="layers sharing one encoder graph")
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}")
    a, b = features(args.dense_n)
    dense, t_dense = timed(lambda: cknna_dense(a, b, 10))
    sparse, t_sparse = timed(lambda: cknna(a, b, 10))
    print(f"n={args.dense_n}: dense reference {t_dense:.2f}s, top-k path {t_sparse:.2f}s "
          f"(x{t_dense / t_sparse:.1f}); CKNNA {sparse:.6f} vs {dense:.6f} (|diff| {abs(sparse - dense):.1e})")
    a, b = features(args.n)
    val, t_full = timed(lambda: cknna(a, b, 10))
    print(f"n={args.n} x {args.n}, k=10, D 1152 vs 768: CKNNA {val:.4f} in {t_full:.2f}s")
    g_enc, t_enc = timed(lambda: knn_graph(b, 10))
    self_enc = graph_self_hsic(g_enc)
    _, t_layers = timed(lambda: [cknna_graphs(knn_graph(a * (i + 1), 10), g_enc, self_b=self_enc)
                                 for i in range(args.layers)])
    print(f"per layer with the encoder graph cached: {t_layers / args.layers:.2f}s "
          f"(encoder graph once: {t_enc:.2f}s); 28 SiT-XL blocks ≈ {28 * t_layers / args.layers + t_enc:.0f}s")


if __name__ == "__main__":
    main()
