"""FID, sFID, IS and precision/recall as the ADM evaluator computes them (DESIGN §6), on plain arrays."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

FID_EPS = 1e-6  # ADM evaluator.py FIDStatistics.frechet_distance: diagonal offset for a singular product
IMAG_ATOL = 1e-3  # ADM: `np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)` before dropping the imaginary part
IS_SPLIT = 5000  # ADM compute_inception_score(split_size=5000), from improved-gan
PR_K = 3  # ADM ManifoldEstimator(nhood_sizes=(3,)), Kynkäänniemi et al. 2019
PR_BATCH = 10000  # ADM ManifoldEstimator row/col batch size


def statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (np.cov, rowvar=False) of activations, in float64."""
    acts = np.asarray(acts, dtype=np.float64)  # (N, D)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"statistics need an (N>=2, D) array, got shape {acts.shape}")
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def psd_factor(sigma: np.ndarray) -> np.ndarray:
    """F (D, r) with sigma = F Fᵀ, r its numerical rank: LAPACK's pivoted Cholesky (dpstrf) of a PSD matrix.

    Cheap when sigma is singular (fewer samples than dimensions: O(D²r)), a plain Cholesky's cost otherwise.
    """
    from scipy.linalg import lapack
    c, piv, rank, info = lapack.dpstrf(np.array(sigma, dtype=np.float64, order="F"), lower=1)
    if info < 0:
        raise np.linalg.LinAlgError(f"dpstrf: illegal argument {-info}")
    factor = np.empty((sigma.shape[0], rank))
    factor[piv - 1] = np.tril(c)[:, :rank]  # Pᵀ Σ P = L Lᵀ  ->  Σ = (P L)(P L)ᵀ
    return factor


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(Σ1 Σ2) from a symmetric eigen-decomposition, with ADM's imaginary-part check.

    With a factor Σ1 = F Fᵀ, Σ1Σ2 = F (Fᵀ Σ2) has the non-zero eigenvalues of Fᵀ Σ2 F, which is symmetric
    PSD: they are real, and the principal square root's trace is Σ sqrt(λ), so no Schur-based sqrtm is needed.
    """
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise np.linalg.LinAlgError("non-finite covariance")
    f = torch.from_numpy(psd_factor(sigma1))  # (D, r)
    m = f.T @ torch.from_numpy(np.ascontiguousarray(sigma2)) @ f  # (r, r)
    lam = torch.linalg.eigvalsh((m + m.T) / 2).numpy()
    if not np.all(np.isfinite(lam)):
        raise np.linalg.LinAlgError("non-finite eigenvalues of Fᵀ·Σ2·F")
    neg = -lam[lam < 0]
    if neg.size and math.sqrt(float(neg.max())) > IMAG_ATOL:
        # sqrtm would return a square root with an imaginary part of this size: ADM raises here.
        raise ValueError(f"Imaginary component {math.sqrt(float(neg.max()))}")
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """|Δμ|² + tr Σ1 + tr Σ2 − 2 tr sqrt(Σ1Σ2) in float64 (ADM retries with eps·I on a singular product)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"covariances have shapes {sigma1.shape} and {sigma2.shape}, means {mu1.shape}")
    diff = mu1 - mu2
    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """Mean over file-order splits of exp(E[KL(p(y|x) || p(y))]), softmax of the unbiased logits."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)  # (N, C)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score needs (N, C) logits, got shape {tuple(logits.shape)}")
    scores = []
    for i in range(0, logits.shape[0], split_size):
        logp = torch.log_softmax(logits[i:i + split_size], dim=1)  # (n, C); log-space avoids 0·log 0 = nan
        log_marginal = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])  # log mean_x p(y|x), (C,)
        kl = (logp.exp() * (logp - log_marginal)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores))


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """max(|u|² − 2 u·vᵀ + |v|², 0) as ADM's DistanceBlock: in `dtype`, redone in fp32 if fp16 overflows."""
    uu, vv = u.to(dtype), v.to(dtype)  # (n, D), (m, D)
    nu = (uu * uu).sum(dim=1, keepdim=True)  # (n, 1)
    nv = (vv * vv).sum(dim=1, keepdim=True).T  # (1, m)
    d = torch.clamp(nu - 2 * (uu @ vv.T) + nv, min=0)  # (n, m)
    if dtype != torch.float32 and not bool(torch.isfinite(d).all()):
        return pairwise_sq_distances(u, v, torch.float32)
    return d.float()


def manifold_radii(feats: torch.Tensor, k: int, dtype: torch.dtype, batch: int = PR_BATCH) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point (the self distance 0 is rank 0)."""
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=feats.device)
    for b0 in range(0, n, batch):
        rows = feats[b0:b0 + batch]
        d = torch.cat([pairwise_sq_distances(rows, feats[c0:c0 + batch], dtype)
                       for c0 in range(0, n, batch)], dim=1)  # (b, n)
        radii[b0:b0 + batch] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return radii


def precision_recall(ref_feats: np.ndarray, sample_feats: np.ndarray, k: int = PR_K, dtype: str = "float32",
                     device: str | torch.device | None = None, batch: int = PR_BATCH) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) with ADM's k-NN radii; returns (precision, recall).

    Precision: share of samples inside some reference ball; recall: share of references inside some sample ball.
    `dtype='float16'` reproduces ADM's fp16 distance arithmetic; 'float32' is exact up to rounding.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    tdtype = torch.float16 if dtype == "float16" else torch.float32
    dev = _pick_device(device)
    ref = torch.as_tensor(np.asarray(ref_feats, dtype=np.float32), device=dev)  # (R, D)
    smp = torch.as_tensor(np.asarray(sample_feats, dtype=np.float32), device=dev)  # (S, D)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"feature arrays must be (N, D) with the same D, got {tuple(ref.shape)}, {tuple(smp.shape)}")
    r_ref, r_smp = manifold_radii(ref, k, tdtype, batch), manifold_radii(smp, k, tdtype, batch)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=dev)
    smp_in = torch.zeros(smp.shape[0], dtype=torch.bool, device=dev)
    for a0 in range(0, ref.shape[0], batch):
        for b0 in range(0, smp.shape[0], batch):
            d = pairwise_sq_distances(ref[a0:a0 + batch], smp[b0:b0 + batch], tdtype)  # (r, s)
            ref_in[a0:a0 + batch] |= (d <= r_smp[None, b0:b0 + batch]).any(dim=1)
            smp_in[b0:b0 + batch] |= (d <= r_ref[a0:a0 + batch, None]).any(dim=0)
    return float(smp_in.double().mean()), float(ref_in.double().mean())
