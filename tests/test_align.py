"""CKNNA and the linear probe: definitions checked against explicit loops and known properties."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from evaluation.align.metric import (PLATONIC_EPS, cknna, cknna_dense, cknna_graphs, graph_self_hsic, hsic_unbiased,
                              knn_graph, pool_tokens)
from evaluation.align.probe import ProbeConfig, heldout_mask, linear_probe


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(n: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 views of one latent signal: B is a linear map of A plus noise."""
    g = _gen(seed)
    a = torch.randn(n, 12, generator=g, dtype=torch.float64)
    b = a @ torch.randn(12, 9, generator=g, dtype=torch.float64) + noise * torch.randn(n, 9, generator=g,
                                                                                        dtype=torch.float64)
    return a, b


# ---- an independent, loop-only implementation of the definition (Huh et al. 2024; REPA Eq. 24) ----

def _loop_knn(feats: list[list[float]], k: int) -> list[set[int]]:
    n = len(feats)
    out = []
    for i in range(n):
        sims = [(sum(x * y for x, y in zip(feats[i], feats[j])), j) for j in range(n) if j != i]
        sims.sort(key=lambda s: -s[0])
        out.append({j for _, j in sims[:k]})
    return out


def _loop_hsic(K: list[list[float]], L: list[list[float]]) -> float:
    """Song et al. 2012 Eq. 5 term by term: diagonals zeroed, tr(KL), 1'K1 1'L1, 1'KL1."""
    n = len(K)
    Kt = [[0.0 if i == j else K[i][j] for j in range(n)] for i in range(n)]
    Lt = [[0.0 if i == j else L[i][j] for j in range(n)] for i in range(n)]
    trace = sum(Kt[i][j] * Lt[j][i] for i in range(n) for j in range(n))
    sk = sum(map(sum, Kt))
    sl = sum(map(sum, Lt))
    kl1 = sum(Kt[i][j] * Lt[j][q] for i in range(n) for j in range(n) for q in range(n))
    return (trace + sk * sl / ((n - 1) * (n - 2)) - 2 * kl1 / (n - 2)) / (n * (n - 3))


def _loop_cknna(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    def unit(rows):
        return [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in rows]
    fa, fb = unit(a.tolist()), unit(b.tolist())
    n = len(fa)
    K = [[sum(x * y for x, y in zip(fa[i], fa[j])) for j in range(n)] for i in range(n)]
    L = [[sum(x * y for x, y in zip(fb[i], fb[j])) for j in range(n)] for i in range(n)]
    na, nb = _loop_knn(fa, k), _loop_knn(fb, k)

    def masked(M, keep):
        return [[M[i][j] if keep(i, j) else 0.0 for j in range(n)] for i in range(n)]
    both = lambda i, j: i != j and j in na[i] and j in nb[i]  # noqa: E731
    kl = _loop_hsic(masked(K, both), masked(L, both))
    kk = _loop_hsic(masked(K, lambda i, j: j in na[i]), masked(K, lambda i, j: j in na[i]))
    ll = _loop_hsic(masked(L, lambda i, j: j in nb[i]), masked(L, lambda i, j: j in nb[i]))
    return kl / math.sqrt(kk * ll)


@pytest.mark.parametrize("n,k,noise,seed", [(7, 2, 0.5, 0), (9, 3, 1.0, 1), (12, 4, 2.0, 2), (10, 9, 0.3, 3)])
def test_matches_explicit_loops(n, k, noise, seed):
    a, b = _pair(n, noise, seed)
    want = _loop_cknna(a, b, k)
    assert cknna(a, b, k) == pytest.approx(want, abs=1e-10)
    assert cknna_dense(a, b, k) == pytest.approx(want, abs=1e-10)


def _unit_circle(degrees: list[float]) -> torch.Tensor:
    t = torch.tensor([math.radians(x) for x in degrees], dtype=torch.float64)
    return torch.stack([t.cos(), t.sin()], 1)


def test_hand_computed_case():
    """n=4, k=1, worked out on paper.

    A at 0°, 10°, 90°, 100°: 1-NN 0→1, 1→0, 2→3, 3→2, every masked kernel value a = cos10°.
    B at 0°, 30°, 50°, 75°: 1-NN 0→1, 1→2, 2→1, 3→2 (L01 = cos30°, L12 = cos20°, L32 = cos25°).
    Mutual mask: (0,1) and (3,2) only. With n=4: HSIC = [tr + ΣK·ΣL/6 − 1ᵀKL1] / 4.
      cross: tr = 0 (no transposed partners), 1ᵀKL1 = 0, so HSIC = 2a(L01+L32)/6/4 = a(L01+L32)/12.
      A self: tr = 4a², ΣΣ = 16a², 1ᵀKK1 = 4a²  ->  (4a² + 16a²/6 − 4a²)/4 = 2a²/3.
      B self: tr = 2L12², S = L01+2L12+L32, 1ᵀLL1 = L12·S  ->  (2L12² + S²/6 − L12·S)/4.
    """
    a = math.cos(math.radians(10))
    l01, l12, l32 = (math.cos(math.radians(x)) for x in (30, 20, 25))
    s = l01 + 2 * l12 + l32
    want = (a * (l01 + l32) / 12) / math.sqrt(2 * a * a / 3 * (2 * l12 ** 2 + s * s / 6 - l12 * s) / 4)
    assert want == pytest.approx(0.484717788870, abs=1e-11)
    A, B = _unit_circle([0, 10, 90, 100]), _unit_circle([0, 30, 50, 75])
    assert cknna(A, B, k=1) == pytest.approx(want, abs=1e-12)
    assert cknna_dense(A, B, k=1) == pytest.approx(want, abs=1e-12)
    assert _loop_cknna(A, B, 1) == pytest.approx(want, abs=1e-12)
    # identical spaces: the mutual mask is each space's own k-NN mask, so the ratio is exactly 1
    assert cknna(A, A * 5, k=2) == pytest.approx(1.0, abs=1e-12)


def test_swapped_points_match_loops():
    """Six points on a circle vs the same with two points traded: partial neighbour agreement, k = 1..3."""
    a = _unit_circle([0, 17, 40, 92, 166, 229])
    b = a[[0, 1, 2, 3, 5, 4]]
    for k in (1, 2, 3):
        assert cknna(a, b, k) == pytest.approx(_loop_cknna(a, b, k), abs=1e-12)


def test_unbiased_hsic_is_the_u_statistic():
    """For symmetric kernels Eq. 5 equals the 4-index U-statistic of Song et al. (Theorem 2)."""
    n = 6
    g = _gen(5)
    x, y = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = y + x  # dependent, so the value is not ~0
    K, L = x @ x.T, y @ y.T
    Kl, Ll = K.tolist(), L.tolist()
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        h = 0.0
        for t, u, v, w in itertools.permutations((i, j, q, r)):
            h += Kl[t][u] * (Ll[t][u] + Ll[v][w] - 2 * Ll[t][v])
        total += h / 24
    u_stat = total / math.perm(n, 4)
    assert float(hsic_unbiased(K, L)) == pytest.approx(u_stat, rel=1e-10)


def test_self_alignment_is_one():
    a, _ = _pair(500, 0.0)
    assert cknna(a, a) == pytest.approx(1.0, abs=1e-9)
    assert cknna(a.float(), a.float() * 3) == pytest.approx(1.0, abs=1e-6)


def test_independent_features_near_zero():
    g = _gen(7)
    vals = [cknna(torch.randn(1000, 32, generator=g), torch.randn(1000, 48, generator=g)) for _ in range(3)]
    assert all(abs(v) < 0.03 for v in vals), vals


def test_invariant_to_rotation_and_isotropic_scale():
    a, b = _pair(300, 1.0, seed=3)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=_gen(4), dtype=torch.float64))
    base = cknna(a, b)
    assert 0.1 < base < 0.99
    assert cknna(a @ q * 7.5, b) == pytest.approx(base, abs=1e-9)
    assert cknna(a, b * 0.01) == pytest.approx(base, abs=1e-9)


def test_not_invariant_to_anisotropic_scaling():
    """The test above could pass with a constant function; a non-isotropic map must change the value."""
    a, b = _pair(300, 1.0, seed=3)
    stretched = a * torch.linspace(0.05, 5, 12, dtype=torch.float64)
    assert abs(cknna(stretched, b) - cknna(a, b)) > 1e-3


def test_alignment_falls_with_noise():
    g = _gen(1)
    a = torch.randn(600, 12, generator=g, dtype=torch.float64)
    noise = torch.randn(600, 12, generator=g, dtype=torch.float64)
    vals = [cknna(a, a + s * noise) for s in (0.05, 0.3, 1.0, 100.0)]
    assert vals == sorted(vals, reverse=True), vals
    assert vals[0] > 0.8 and vals[-1] < 0.05, vals


def test_sparse_equals_dense_float32_and_chunking():
    g = _gen(11)
    a, b = torch.randn(257, 20, generator=g), torch.randn(257, 10, generator=g)
    b[:, :5] += a[:, :5]
    dense = cknna_dense(a, b, 10)
    assert cknna(a, b, 10) == pytest.approx(dense, abs=1e-6)
    ga, gb = knn_graph(a, 10, chunk=16), knn_graph(b, 10, chunk=1000)
    assert cknna_graphs(ga, gb) == pytest.approx(dense, abs=1e-6)
    assert cknna_graphs(ga, gb, self_b=graph_self_hsic(gb)) == pytest.approx(dense, abs=1e-6)
    assert not (ga.idx == torch.arange(257)[:, None]).any(), "a point is never its own neighbour"


def test_platonic_eps_and_numpy_inputs():
    a, b = _pair(200, 1.0)
    exact = cknna(a.numpy(), b.numpy())
    with_eps = cknna(a, b, eps=PLATONIC_EPS)
    assert exact == pytest.approx(cknna(a, b))
    assert abs(with_eps) < abs(exact)  # the guard only ever shrinks the value


def test_bad_arguments():
    a = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k=10"):
        cknna(a, a, k=10)
    with pytest.raises(ValueError, match="different sample counts"):
        cknna(a, a[:9], k=3)
    with pytest.raises(ValueError, match="at least 4"):
        cknna(a[:3], a[:3], k=1)
    with pytest.raises(ValueError, match="2-D"):
        cknna(a[None], a[None], k=2)


def test_pool_tokens():
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    assert torch.equal(pool_tokens(t), t.mean(1))


# ---- linear probe ----

def _blobs(n: int, classes: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.standard_normal((classes, dim)) * 3
    return centres[y] + rng.standard_normal((n, dim)) * 0.5 + 10.0, y  # offset: BN must remove it


def test_probe_separable_and_shuffled():
    x, y = _blobs(800, 8, 24, seed=0)
    test = heldout_mask([f"img{i:05d}" for i in range(len(y))])
    cfg = ProbeConfig(epochs=20, batch_size=128, seed=0)
    res = linear_probe(x[~test], y[~test], x[test], y[test], 8, cfg)
    assert res.top1 > 0.95 and res.train_top1 > 0.95
    shuffled = np.random.default_rng(1).permutation(y)
    res = linear_probe(x[~test], shuffled[~test], x[test], shuffled[test], 8, cfg)
    assert res.top1 < 0.3, res  # chance is 1/8; it cannot generalise labels that carry no signal


def test_heldout_split_is_by_key():
    keys = [f"n0144_{i}" for i in range(2000)]
    m = heldout_mask(keys)
    assert 0.17 < m.mean() < 0.23
    rev = heldout_mask(keys[::-1])[::-1]
    assert np.array_equal(m, rev), "a key's side must not depend on order or subset"
