"""Sampler maths: closed-form Gaussian data, the reference time grids, the CFG interval, per-sample noise."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.samplers import sample_ode, sample_sde

# Per-channel Gaussian data x0 ~ N(M, S^2): 4 channels, as a latent has.
M = torch.tensor([0.7, -0.3, 0.0, 1.2], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 0.2, 0.8], dtype=torch.float64)
NUM_CLASSES = 10


def coeffs(t: float, path: str) -> tuple[float, float, float, float]:
    """α, σ, α', σ' written out here (independently of trainer.transport)."""
    if path == "linear":
        return 1.0 - t, t, -1.0, 1.0
    h = math.pi / 2
    return math.cos(h * t), math.sin(h * t), -h * math.sin(h * t), h * math.cos(h * t)


def exact_velocity(x: torch.Tensor, t: float, path: str) -> torch.Tensor:
    """E[α'x0 + σ'ε | x_t = x] for Gaussian x0: affine in x (x float64, (N, 4, H, W))."""
    a, s, da, ds = coeffs(t, path)
    m, v0 = M.view(1, 4, 1, 1), (S ** 2).view(1, 4, 1, 1)
    var = a * a * v0 + s * s
    return da * m + (a * da * v0 + s * ds) / var * (x - a * m)


class GaussianModel(torch.nn.Module):
    """The exact velocity field of Gaussian data, behind the SiT calling convention."""

    def __init__(self, path: str = "linear"):
        super().__init__()
        self.path, self.num_classes = path, NUM_CLASSES

    def forward(self, x, t, y=None):
        assert x.dtype == torch.float32 and t.dtype == torch.float32  # the model is called in fp32
        return exact_velocity(x.double(), float(t[0]), self.path).float(), []


def moment_recursion(mode: str, steps: int, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean/std per channel of the discretised sampler's output (everything is affine-Gaussian)."""
    mu, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    m, v0 = M, S ** 2
    if mode == "sde":
        grid = [1.0 - i * (1.0 - 0.04) / (steps - 1) for i in range(steps)] + [0.0]
    else:
        grid = [1.0 - i / steps for i in range(steps + 1)]
    for i in range(steps):
        t, dt = grid[i], grid[i + 1] - grid[i]
        a, s, da, ds = coeffs(t, path)
        vt = a * a * v0 + s * s
        k = (a * da * v0 + s * ds) / vt  # v = da·m + k·(x − a·m)
        if mode == "sde":
            p = k + t / vt  # drift = v − ½·2t·score, true score = −(x − a·m)/vt
            q = da * m - k * a * m - t * a * m / vt
            noise = 2 * t * abs(dt) if i < steps - 1 else 0.0
        else:
            p, q, noise = k, da * m - k * a * m, 0.0
        mu, var = mu + (p * mu + q) * dt, (1 + p * dt) ** 2 * var + noise
    return mu, var.sqrt()


@pytest.mark.parametrize("mode,path", [("sde", "linear"), ("ode", "linear"), ("sde", "cosine"), ("ode", "cosine")])
def test_closed_form_gaussian(mode, path):
    """Default steps (SDE 250, ODE 50) reproduce N(M, S²).

    Tolerance: n = 8192·4 = 32768 draws per channel, so the standard error of the mean is S/181 and of the
    std S/256. We allow the discretisation bias plus 5 standard errors (a false failure has probability
    < 1e-6 per check). The bias is computed exactly by `moment_recursion` (the output is Gaussian with an
    affine recursion for its moments). It is real and must stay < 10% of S: the SDE stops at t=0.04 and
    takes a mean step, which shrinks the std of a narrow (S=0.2) channel by 6% (linear) / 8% (cosine);
    Euler at 50 steps shrinks it by up to 5%. For unit-variance data, as SD latents are, both are < 3%.
    """
    n, steps = 8192, (250 if mode == "sde" else 50)
    gen = torch.Generator().manual_seed(1234)
    noise = torch.randn(n, 4, 2, 2, generator=gen)
    y = torch.zeros(n, dtype=torch.long)
    model = GaussianModel(path)
    if mode == "sde":
        out = sample_sde(model, noise, y, generator=gen, path=path)
    else:
        out = sample_ode(model, noise, y, path=path)
    assert out.dtype == torch.float64 and out.shape == noise.shape
    flat = out.permute(1, 0, 2, 3).reshape(4, -1)  # (4, n·4)
    emp_mean, emp_std = flat.mean(1), flat.std(1)
    exp_mean, exp_std = moment_recursion(mode, steps, path)
    bias_m, bias_s = (exp_mean - M).abs(), (exp_std - S).abs()
    assert (bias_m < 0.1 * S).all() and (bias_s < 0.1 * S).all(), (bias_m, bias_s)
    draws = flat.shape[1]
    se_m, se_s = S / math.sqrt(draws), S / math.sqrt(2 * draws)
    assert ((emp_mean - M).abs() <= bias_m + 5 * se_m).all(), (emp_mean, M, bias_m)
    assert ((emp_std - S).abs() <= bias_s + 5 * se_s).all(), (emp_std, S, bias_s)
    # Tighter: the sampler matches the exact law of its own discretisation.
    assert ((emp_mean - exp_mean).abs() <= 5 * se_m).all() and ((emp_std - exp_std).abs() <= 5 * se_s).all()


def test_heun_beats_euler():
    """Heun's discretisation error is far below Euler's at the same steps (noise-free ODE, same start)."""
    noise = torch.randn(512, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(512, dtype=torch.long)
    fine = sample_ode(GaussianModel(), noise, y, steps=2000)
    err_euler = (sample_ode(GaussianModel(), noise, y, steps=10) - fine).abs().max()
    err_heun = (sample_ode(GaussianModel(), noise, y, steps=10, heun=True) - fine).abs().max()
    assert err_heun < err_euler / 5, (err_euler, err_heun)


class Recorder(torch.nn.Module):
    """Records (t, batch labels) of each call; v = 1 for the null class, 2 otherwise."""

    def __init__(self):
        super().__init__()
        self.num_classes, self.calls = NUM_CLASSES, []

    def forward(self, x, t, y=None):
        assert (t == t[0]).all() and len(y) == len(x)
        self.calls.append((float(t[0]), y.clone()))
        v = torch.where(y == NUM_CLASSES, 1.0, 2.0).view(-1, 1, 1, 1).expand_as(x)
        return v.float(), []


def test_sde_official_time_grid():
    """`steps` calls at linspace(1, 0.04, steps); the last at t=0.04; the last update is noise-free."""
    rec = Recorder()
    steps = 7
    noise = torch.zeros(3, 4, 2, 2)
    sample_sde(rec, noise, torch.zeros(3, dtype=torch.long), steps=steps, generator=torch.Generator())
    ts = [c[0] for c in rec.calls]
    assert len(ts) == steps
    assert ts == pytest.approx(torch.linspace(1, 0.04, steps, dtype=torch.float64).tolist(), abs=1e-7)
    assert ts[0] == 1.0 and ts[-1] == pytest.approx(0.04, abs=1e-7)
    # Two runs with different generators differ only through the stochastic steps: with steps=1 the single
    # step is the deterministic mean step, so the result must not depend on the generator.
    a = sample_sde(Recorder(), noise, torch.zeros(3, dtype=torch.long), steps=1,
                   generator=torch.Generator().manual_seed(1))
    b = sample_sde(Recorder(), noise, torch.zeros(3, dtype=torch.long), steps=1,
                   generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("heun", [False, True])
def test_ode_time_grid(heun):
    rec, steps = Recorder(), 5
    sample_ode(rec, torch.zeros(2, 4, 2, 2), torch.zeros(2, dtype=torch.long), steps=steps, heun=heun)
    ts = [c[0] for c in rec.calls]
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    if heun:  # predictor at t_i, corrector at t_{i+1}; no correction on the final step to 0
        want = [t for i in range(steps) for t in ((grid[i], grid[i + 1]) if i < steps - 1 else (grid[i],))]
    else:
        want = grid[:-1]
    assert ts == pytest.approx(want, abs=1e-7)
    assert 0.0 not in ts


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_cfg_interval(mode):
    """Inside [low, high] the batch is doubled with the null class; outside, no unconditional call at all."""
    n, lo, hi, scale = 3, 0.3, 0.7, 4.0
    y = torch.tensor([1, 5, 9])
    rec = Recorder()
    noise = torch.zeros(n, 4, 2, 2)
    kw = dict(steps=20, cfg_scale=scale, guidance_low=lo, guidance_high=hi)
    if mode == "sde":
        out = sample_sde(rec, noise, y, generator=torch.Generator().manual_seed(0), **kw)
    else:
        out = sample_ode(rec, noise, y, **kw)
    inside = 0
    for t, ys in rec.calls:
        if lo <= t <= hi:
            inside += 1
            assert torch.equal(ys, torch.cat([y, torch.full((n,), NUM_CLASSES)])), t
        else:
            assert torch.equal(ys, y), t  # the null class is never evaluated outside the interval
    assert 0 < inside < len(rec.calls)
    if mode == "ode":  # v = 2 unguided, 1 + s·(2 − 1) guided; Euler integrates it exactly
        ts = [c[0] for c in rec.calls] + [0.0]
        want = sum((ts[i] - ts[i + 1]) * ((1 + scale) if lo <= ts[i] <= hi else 2.0) for i in range(20))
        assert torch.allclose(out, torch.full_like(out, -want))


def test_no_cfg_when_scale_is_one():
    rec = Recorder()
    sample_ode(rec, torch.zeros(2, 4, 2, 2), torch.tensor([0, 1]), steps=4, cfg_scale=1.0)
    assert all(len(ys) == 2 for _, ys in rec.calls)


def test_per_sample_generators_batch_free():
    """With one generator per sample, sample i's SDE noise does not depend on how the batch is cut."""
    model = GaussianModel()
    noise = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(8, dtype=torch.long)

    def gens(idx):
        return [torch.Generator().manual_seed(1000 + i) for i in idx]

    whole = sample_sde(model, noise, y, steps=20, generator=gens(range(8)))
    parts = torch.cat([sample_sde(model, noise[a:b], y[a:b], steps=20, generator=gens(range(a, b)))
                       for a, b in ((0, 3), (3, 6), (6, 8))])
    assert torch.allclose(whole, parts, rtol=0, atol=1e-6)
    other = sample_sde(model, noise, y, steps=20, generator=[torch.Generator().manual_seed(7)] * 8)
    assert not torch.allclose(whole, other)


@pytest.mark.parametrize("lo,hi", [(0.0, 0.7), (0.5, 1.0), (0.5, 0.7)])
def test_heun_corrector_is_guided_exactly_when_its_predictor_was(lo, hi):
    """The grid 1, .8, .6, .4, .2, 0 puts each interval edge between a predictor (t_i) and its corrector (t_i+1).

    The reference decides guidance at t_cur for both Heun evaluations; deciding at t_next would guide the
    corrector at .6 after an unguided predictor at .8 (high .7), or leave the corrector at .4 unguided after a
    guided predictor at .6 (low .5). Both would change the output, which this sampler integrates exactly.
    """
    n, scale, steps = 2, 3.0, 5
    y = torch.tensor([2, 7])
    rec = Recorder()
    out = sample_ode(rec, torch.zeros(n, 4, 2, 2), y, steps=steps, heun=True, cfg_scale=scale,
                     guidance_low=lo, guidance_high=hi)
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    doubled = [len(ys) == 2 * n for _, ys in rec.calls]
    ts = [t for t, _ in rec.calls]
    k = 0
    crossings = 0
    for i in range(steps):
        want = lo <= grid[i] <= hi  # decided at the predictor's time
        assert ts[k] == pytest.approx(grid[i], abs=1e-7) and doubled[k] == want, (i, ts[k])
        if i < steps - 1:  # the corrector at t_{i+1}: guided exactly as its predictor
            assert ts[k + 1] == pytest.approx(grid[i + 1], abs=1e-7) and doubled[k + 1] == want, (i, ts[k + 1])
            crossings += want != (lo <= grid[i + 1] <= hi)
            k += 2
        else:
            k += 1
    assert k == len(rec.calls) == 2 * steps - 1 and crossings >= 1  # an edge really falls inside a step
    # Recorder: v = 2 unguided, 1 + s·(2 − 1) guided. With both Heun stages alike the step is exact.
    want = sum((grid[i] - grid[i + 1]) * ((1 + scale) if lo <= grid[i] <= hi else 2.0) for i in range(steps))
    assert torch.allclose(out, torch.full_like(out, -want))
