"""Evaluation numerics: TF1 resize, sFID layout, FID, IS and precision/recall against known answers."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from evaluation.inception import SPATIAL_DIM, InceptionFeatures, flatten_spatial
from evaluation.metrics import frechet_distance, inception_score, precision_recall, statistics, trace_sqrt_product


# ---- TF1 legacy resize --------------------------------------------------------------------------------------

def numpy_tf1_bilinear(img: np.ndarray, out: int) -> np.ndarray:
    """Independent TF1 `resize_bilinear(align_corners=False)`: src = dst·(in/out) in float32 as TF computes it,
    no half-pixel offset, the upper neighbour clamped at the border."""
    def axis(n_in):
        src = np.arange(out, dtype=np.float32) * np.float32(n_in / out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float64)
    (y0, y1, dy), (x0, x1, dx) = axis(img.shape[1]), axis(img.shape[2])
    top = img[:, y0][:, :, x0] * (1 - dx) + img[:, y0][:, :, x1] * dx
    bot = img[:, y1][:, :, x0] * (1 - dx) + img[:, y1][:, :, x1] * dx
    return top * (1 - dy[:, None]) + bot * dy[:, None]  # (C, out, out)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures("random:0")


@pytest.mark.parametrize("h,w", [(37, 53), (301, 7), (5, 5)])
def test_network_input_is_tf1_resize_then_scale(inception, h, w):
    """What the product's network really feeds its first conv: the TF1 legacy resize of the uint8 image to 299,
    then (x−128)/128 (read at Conv2d_1a_3x3, where the forward is then stopped)."""
    rng = np.random.default_rng(h * w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    seen = {}

    def grab(module, inputs):
        seen["x"] = inputs[0].detach().clone()
        raise _Stop
    handle = inception.net.Conv2d_1a_3x3.register_forward_pre_hook(grab)
    try:
        with pytest.raises(_Stop):
            inception(img[None])  # uint8 NHWC, as every caller passes it
    finally:
        handle.remove()
    got = seen["x"][0].numpy()  # (3, 299, 299)
    chw = img.transpose(2, 0, 1).astype(np.float64)
    want = (numpy_tf1_bilinear(chw, 299) - 128) / 128
    assert got.shape == (3, 299, 299)
    np.testing.assert_allclose(got, want, atol=1e-5)
    torch_bilinear = F.interpolate(torch.from_numpy(chw.astype(np.float32))[None], size=(299, 299), mode="bilinear",
                                   align_corners=False)[0].numpy()
    assert np.abs((torch_bilinear - 128) / 128 - want).max() > 1 / 128  # half-pixel centres: a different image


# ---- sFID features ------------------------------------------------------------------------------------------

def test_spatial_flatten_is_hwc_order():
    n, c, g = 2, 192, 17
    hh, ww, cc = np.meshgrid(np.arange(g), np.arange(g), np.arange(c), indexing="ij")
    planted = torch.from_numpy((cc + 10 * ww + 1000 * hh).transpose(2, 0, 1).astype(np.float32))
    fmap = torch.stack([planted, planted + 1e5])  # (2, 192, 17, 17)
    flat = flatten_spatial(fmap)
    assert flat.shape == (n, SPATIAL_DIM) == (2, 2023)
    for h, w, ch in [(0, 0, 0), (0, 0, 6), (0, 1, 0), (3, 5, 2), (16, 16, 6)]:
        assert flat[0, (h * g + w) * 7 + ch] == ch + 10 * w + 1000 * h
    assert flat[1, 0] == 1e5
    assert flat[0].max() == 6 + 10 * 16 + 1000 * 16  # only channels 0..6 kept


def test_spatial_hook_takes_post_relu_mixed_6d_branch1x1():
    model = InceptionFeatures("random:0")
    seen = {}
    conv = model.net.Mixed_6d.branch1x1

    def pre_relu(mod, inp, out):  # recompute conv + bn without the ReLU, independently of the hook
        seen["pre"] = mod.bn(mod.conv(inp[0])).clone()
    h = conv.register_forward_hook(pre_relu)
    x = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    feats = model(x)
    h.remove()
    want = flatten_spatial(torch.relu(seen["pre"]))
    assert (seen["pre"] < 0).any()  # the ReLU matters here
    torch.testing.assert_close(feats.spatial, want)
    assert feats.pool.shape == (2, 2048) and feats.logits.shape == (2, 1008)
    torch.testing.assert_close(feats.logits, feats.pool @ model.net.fc.weight.T)  # unbiased logits


# ---- FID ----------------------------------------------------------------------------------------------------

def test_fid_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_fid_of_identical_statistics_is_zero():
    acts = np.random.default_rng(1).standard_normal((500, 64))
    mu, sigma = statistics(acts)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def _spd(rng, d, cond=1e3):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, 1.0 / cond, d)) @ q.T


def test_eigen_trace_matches_scipy_sqrtm_small():
    rng = np.random.default_rng(256)
    for cond in (10.0, 1e4):
        s1, s2 = _spd(rng, 256, cond), _spd(rng, 256, cond)
        assert abs(trace_sqrt_product(s1, s2) - np.trace(scipy.linalg.sqrtm(s1 @ s2)).real) < 1e-6


def test_eigen_trace_at_inception_size_matches_a_closed_form():
    """At Inception's 2048 dims, a non-commuting pair with a known answer: with Σ2 = Σ1^-½ M² Σ1^-½ (M SPD),
    Σ1Σ2 = Σ1^½ M² Σ1^-½ is similar to M², so tr sqrt(Σ1Σ2) = tr M (scipy's sqrtm would take ~20 s here)."""
    rng = np.random.default_rng(2048)
    d = 2048
    q = np.eye(d)
    for _ in range(4):  # an orthogonal basis from Householder reflections: O(d²) each, not a QR of a d x d matrix
        v = rng.standard_normal(d)
        q -= np.outer(q @ v, v) * (2 / (v @ v))
    lam = np.geomspace(1.0, 1e-3, d)
    s1, s1_inv_half = (q * lam) @ q.T, (q / np.sqrt(lam)) @ q.T
    b = rng.standard_normal((d, d))
    m = b @ b.T / d + 0.1 * np.eye(d)
    s2 = s1_inv_half @ (m @ m) @ s1_inv_half
    s2 = (s2 + s2.T) / 2
    assert not np.allclose(s1 @ s2, s2 @ s1)  # the general case, not a commuting pair
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(m), rel=1e-9)


def test_fid_of_singular_covariances_matches_the_gram_form():
    """Fewer points than dimensions: tr sqrt(Σ1Σ2) is the nuclear norm of A1·A2ᵀ/sqrt((n1-1)(n2-1))."""
    rng = np.random.default_rng(3)
    for n1, n2, d in [(20, 30, 64), (6, 9, 2048)]:
        a, b = rng.standard_normal((n1, d)), rng.standard_normal((n2, d)) * 1.3 + 0.2
        (m1, s1), (m2, s2) = statistics(a), statistics(b)
        c1, c2 = a - m1, b - m2
        tr = np.linalg.svd(c1 @ c2.T / np.sqrt((n1 - 1) * (n2 - 1)), compute_uv=False).sum()
        want = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)


def test_fid_imaginary_component_is_an_error():
    s = np.eye(8)
    with pytest.raises(ValueError, match="Imaginary component"):
        frechet_distance(np.zeros(8), s, np.zeros(8), -s)  # not a covariance: sqrt would be imaginary


def test_statistics_are_float64_numpy_cov():
    acts = np.random.default_rng(4).standard_normal((40, 16)).astype(np.float32)
    mu, sigma = statistics(acts)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(acts.astype(np.float64), rowvar=False), rtol=1e-12)


# ---- IS -----------------------------------------------------------------------------------------------------

def test_inception_score_known_values():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    c = 10
    confident = np.full((200, c), -1e4)
    confident[np.arange(200), np.arange(200) % c] = 1e4  # one-hot predictions, balanced over c classes
    assert inception_score(confident) == pytest.approx(c, rel=1e-9)
    # two splits in file order: 4 classes in the first, 2 in the second -> mean(4, 2)
    split = np.full((16, 8), -1e4)
    split[np.arange(8), np.arange(8) % 4] = 1e4
    split[8 + np.arange(8), np.arange(8) % 2] = 1e4
    assert inception_score(split, split_size=8) == pytest.approx(3.0, rel=1e-9)


# ---- precision / recall -------------------------------------------------------------------------------------

def numpy_pr(ref, smp, k=3):
    """Brute force: squared distances, k-th nearest other point, balls."""
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_smp = np.sort(d2(smp, smp), axis=1)[:, k]
    cross = d2(ref, smp)  # (R, S)
    precision = np.mean((cross <= r_ref[:, None]).any(axis=0))
    recall = np.mean((cross <= r_smp[None, :]).any(axis=1))
    return precision, recall


def test_precision_recall_constructed_clouds():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((60, 8))
    # Identical sets: every point sits in its own ball.
    assert precision_recall(ref, ref.copy(), batch=7) == (1.0, 1.0)
    # Half the samples copy reference points, half form a far, tight cluster: precision 1/2. The far cluster's
    # balls are tiny, the copies' balls cover their own reference points: recall = 30/60.
    far = 100.0 + 0.01 * rng.standard_normal((30, 8))
    smp = np.concatenate([ref[:30], far])
    p, r = precision_recall(ref, smp, batch=16)
    assert p == pytest.approx(0.5)
    assert (p, r) == pytest.approx(numpy_pr(ref, smp))
    assert r >= 0.5
    # Disjoint sets: nothing inside anything.
    assert precision_recall(ref, ref + 1e3) == (0.0, 0.0)


def test_precision_recall_matches_brute_force_and_fp16_is_close():
    rng = np.random.default_rng(6)
    ref = np.abs(rng.standard_normal((300, 64))).astype(np.float32)  # pool3-like: non-negative
    smp = (np.abs(rng.standard_normal((250, 64))) * 1.1).astype(np.float32)
    p32, r32 = precision_recall(ref, smp, dtype="float32", batch=64)
    assert (p32, r32) == pytest.approx(numpy_pr(ref.astype(np.float64), smp.astype(np.float64)))
    p16, r16 = precision_recall(ref, smp, dtype="float16", batch=64)
    assert abs(p16 - p32) <= 1e-3 + 1 / 250 and abs(r16 - r32) <= 1e-3 + 1 / 300  # at most one point flips
    assert 0.0 < p32 < 1.0 and 0.0 < r32 < 1.0
