"""CPU benchmark: eigen-based FID vs scipy.linalg.sqrtm at 2048 dims, and precision/recall at 10k x 10k.

    python tests/benchmarks/bench_evaluation.py [--dim 2048] [--pr-n 10000] [--skip-sqrtm]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def covariances(d: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Two pool3-like statistics: SPD covariances with a decaying spectrum (condition ~1e4)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        out += [np.abs(rng.standard_normal(d)), (q * np.geomspace(1.0, 1e-4, d)) @ q.T]
    return tuple(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--pr-n", type=int, default=10_000)
    ap.add_argument("--skip-sqrtm", action="store_true", help="skip the (slow) scipy reference")
    args = ap.parse_args()
    import scipy.linalg
    import torch

    from evaluation.metrics import frechet_distance, precision_recall

    mu1, s1, mu2, s2 = covariances(args.dim)
    t0 = time.perf_counter()
    fid = frechet_distance(mu1, s1, mu2, s2)
    t_eig = time.perf_counter() - t0
    res = {"bench": "evaluation", "threads": torch.get_num_threads(), "dim": args.dim, "fid_eigen": fid,
           "eigen_s": round(t_eig, 2)}
    print(f"FID at {args.dim} dims, eigen-based: {fid:.9f} in {t_eig:.2f}s", flush=True)
    if not args.skip_sqrtm:
        t0 = time.perf_counter()
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        diff = mu1 - mu2
        fid_ref = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
        t_sqrtm = time.perf_counter() - t0
        res.update(fid_sqrtm=fid_ref, sqrtm_s=round(t_sqrtm, 2), abs_delta_fid=abs(fid - fid_ref),
                   speedup=round(t_sqrtm / t_eig, 1))
        print(f"FID at {args.dim} dims, scipy sqrtm: {fid_ref:.9f} in {t_sqrtm:.2f}s -> "
              f"{t_sqrtm / t_eig:.1f}x faster, |dFID| = {abs(fid - fid_ref):.2e}", flush=True)

    rng = np.random.default_rng(1)
    ref = np.abs(rng.standard_normal((args.pr_n, 2048))).astype(np.float32)  # pool3-like: non-negative
    smp = (np.abs(rng.standard_normal((args.pr_n, 2048))) * 1.05).astype(np.float32)
    t0 = time.perf_counter()
    p, r = precision_recall(ref, smp, dtype="float32", device="cpu")
    t_pr = time.perf_counter() - t0
    res.update(pr_n=args.pr_n, pr_s=round(t_pr, 2), precision=p, recall=r)
    print(f"precision/recall {args.pr_n} x {args.pr_n} x 2048 (fp32, CPU): P={p:.4f} R={r:.4f} in {t_pr:.1f}s")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
