"""DiT's DDPM objective and samplers against float64 numpy written out here from gaussian_diffusion.py's formulas."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from trainer.models.dit import DiT_models
from trainer.objectives.ddpm import (Diffusion, ddpm_repa_loss, discretized_gaussian_log_likelihood, loss_terms,
                                     noisy, space_timesteps, timestep_from_time)
from trainer.objectives.interpolant import cos_proj_loss
from trainer.sampling.ddpm import check_guide_channels, ddim, ddpm, guide, sample_ddim, sample_ddpm

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # float64: Ho et al.'s linear schedule
ACP = np.cumprod(1.0 - BETAS)


def schedule(betas: np.ndarray) -> dict[str, np.ndarray]:
    """ᾱ, ᾱ_prev, β̃ and its clipped log (β̃_1 at t=0) for any betas."""
    acp = np.cumprod(1.0 - betas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    return {"b": betas, "a": acp, "ap": acp_prev, "pv": post_var, "plv": clipped}


def col(v: np.ndarray, t: np.ndarray) -> np.ndarray:
    return v[t].reshape(-1, 1, 1, 1)


def np_posterior(s: dict, x0: np.ndarray, xt: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q(x_{t-1} | x_t, x0): mean and clipped log variance (Ho et al. eq. 7)."""
    b, a, ap = col(s["b"], t), col(s["a"], t), col(s["ap"], t)
    mean = b * np.sqrt(ap) / (1 - a) * x0 + (1 - ap) * np.sqrt(1 - b) / (1 - a) * xt
    return mean, np.broadcast_to(col(s["plv"], t), xt.shape)


def np_model_mean_logvar(s: dict, out: np.ndarray, xt: np.ndarray, t: np.ndarray, c: int = 4):
    """ε -> x̂0 -> posterior mean; v in [-1, 1] -> log var between log β̃ (clipped) and log β."""
    eps, v = out[:, :c], out[:, c:]
    a = col(s["a"], t)
    x0_hat = np.sqrt(1 / a) * xt - np.sqrt(1 / a - 1) * eps
    mean, lo = np_posterior(s, x0_hat, xt, t)
    frac = (v + 1) / 2
    return mean, frac * np.log(col(s["b"], t)) + (1 - frac) * lo, x0_hat


def phi(x):
    """The tanh approximation of the normal CDF (IDDPM / DiT diffusion_utils)."""
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_decoder_logp(x0: np.ndarray, mean: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
    inv = np.exp(-log_scale)
    hi, lo = phi(inv * (x0 - mean + 1 / 255)), phi(inv * (x0 - mean - 1 / 255))
    return np.where(x0 < -0.999, np.log(np.maximum(hi, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(hi - lo, 1e-12))))


def _data(n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    x0 = g.uniform(-1, 1, (n, 4, 4, 4))
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0  # the open-ended edge bins of the decoder NLL
    out = np.concatenate([g.normal(size=(n, 4, 4, 4)), g.uniform(-1, 1, (n, 4, 4, 4))], axis=1)  # ε, then v
    return x0, g.normal(size=(n, 4, 4, 4)), out


def test_q_sample_and_posterior_closed_forms():
    d, s = Diffusion.base(), schedule(BETAS)
    x0, noise, _ = _data(5)
    t = np.array([0, 1, 250, 998, 999])
    tt = torch.from_numpy(t)
    xt = np.sqrt(col(ACP, t)) * x0 + np.sqrt(1 - col(ACP, t)) * noise
    got = d.q_sample(torch.from_numpy(x0), tt, torch.from_numpy(noise))
    np.testing.assert_allclose(got.numpy(), xt, rtol=1e-12, atol=1e-12)
    mean, var, logvar = d.q_posterior(torch.from_numpy(x0), torch.from_numpy(xt), tt)
    want_mean, want_logvar = np_posterior(s, x0, xt, t)
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(col(s["pv"], t), xt.shape), rtol=1e-12)
    np.testing.assert_allclose(logvar.numpy(), want_logvar, rtol=1e-12)
    assert var[0].abs().max() == 0 and logvar[0, 0, 0, 0] == logvar[1, 0, 0, 0]  # β̃_0 = 0, its log clipped to β̃_1
    np.testing.assert_allclose(d.tables["betas"][[0, -1]], [1e-4, 0.02])


def test_loss_terms_mse_and_vb_against_the_written_out_formulas():
    """At t = 0 (decoder NLL), 1, a middle t and the last one (KL in bits), each term on its own."""
    s = schedule(BETAS)
    x0, noise, out = _data(4, seed=1)
    t = np.array([0, 1, 371, 999])
    xt = np.sqrt(col(ACP, t)) * x0 + np.sqrt(1 - col(ACP, t)) * noise
    terms = loss_terms(*(torch.from_numpy(a) for a in (out, x0, xt, t, noise)))
    want_mse = ((noise - out[:, :4]) ** 2).mean(axis=(1, 2, 3))
    true_mean, true_lv = np_posterior(s, x0, xt, t)
    m_mean, m_lv, _ = np_model_mean_logvar(s, out, xt, t)
    kl = 0.5 * (-1 + m_lv - true_lv + np.exp(true_lv - m_lv) + (true_mean - m_mean) ** 2 * np.exp(-m_lv))
    nll = -np_decoder_logp(x0, m_mean, 0.5 * m_lv)
    want_vb = np.where(t == 0, nll.mean(axis=(1, 2, 3)), kl.mean(axis=(1, 2, 3))) / np.log(2)
    np.testing.assert_allclose(terms["mse"].numpy(), want_mse, rtol=1e-12)
    np.testing.assert_allclose(terms["vb"].numpy(), want_vb, rtol=1e-9)
    np.testing.assert_allclose(terms["loss"].numpy(), want_mse + want_vb, rtol=1e-9)
    assert (terms["vb"] > 0).all()
    # float32 inputs (the trainer's) give the same terms to float32 precision
    t32 = loss_terms(*(torch.from_numpy(a).float() for a in (out, x0, xt)), torch.from_numpy(t),
                     torch.from_numpy(noise).float())
    np.testing.assert_allclose(t32["vb"].numpy(), want_vb, rtol=2e-3)


def test_kl_is_zero_when_the_model_predicts_the_true_posterior():
    x0, noise, _ = _data(3, seed=2)
    t = torch.tensor([1, 500, 999])
    d = Diffusion.base()
    x0, noise = torch.from_numpy(x0), torch.from_numpy(noise)
    xt = d.q_sample(x0, t, noise)
    exact = torch.cat([noise, -torch.ones_like(noise)], 1)  # true ε; v = -1: log var = log β̃_t
    vb = loss_terms(exact, x0, xt, t, noise)["vb"]
    assert vb.abs().max() < 1e-9
    wider = torch.cat([noise, torch.ones_like(noise)], 1)  # v = +1: log var = log β_t > log β̃_t
    vb_wide = loss_terms(wider, x0, xt, t, noise)["vb"]
    assert vb_wide[0] > 0.1 and (vb_wide > 0).all()  # at t=999 β and β̃ nearly agree, so the KL is tiny there


def test_decoder_nll_hand_case():
    """One pixel each in the middle bin and the two edge bins; mean 0.25, std 0.4."""
    x = torch.tensor([0.3, -1.0, 1.0], dtype=torch.float64)
    m = torch.full_like(x, 0.25)
    ls = torch.full_like(x, math.log(0.4))

    def cdf(z):  # the tanh approximation, by hand
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    h = 1 / 255
    want = [math.log(cdf((0.05 + h) / 0.4) - cdf((0.05 - h) / 0.4)),  # the bin [x - 1/255, x + 1/255]
            math.log(cdf((-1.25 + h) / 0.4)),  # everything below -1 + 1/255
            math.log(1 - cdf((0.75 - h) / 0.4))]  # everything above 1 - 1/255
    got = discretized_gaussian_log_likelihood(x, m, ls)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    exact_mid = math.log(0.5 * (math.erf((0.05 + h) / 0.4 / math.sqrt(2)) - math.erf((0.05 - h) / 0.4 / math.sqrt(2))))
    assert abs(got[0].item() - exact_mid) < 1e-3  # and the approximation is close to the true Φ


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    x0, noise, out = (torch.from_numpy(a) for a in _data(2, seed=3))
    t = torch.tensor([0, 600])
    xt = Diffusion.base().q_sample(x0, t, noise)
    out.requires_grad_(True)
    terms = loss_terms(out, x0, xt, t, noise)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_vb[:, :4].abs().max() == 0 and g_vb[:, 4:].abs().max() > 0  # DiT's frozen mean
    assert g_mse[:, 4:].abs().max() == 0 and g_mse[:, :4].abs().max() > 0
    no_sigma = loss_terms(out[:, :4].detach(), x0, xt, t, noise)  # learn_sigma=False: mse only
    assert torch.equal(no_sigma["vb"], torch.zeros(2, dtype=torch.float64))


def test_space_timesteps_and_respacing():
    kept = space_timesteps(1000, 250)
    assert kept == [round(Fraction(999 * j, 249)) for j in range(250)]  # even stride 999/249, both ends in
    assert space_timesteps(1000, "250") == kept and space_timesteps(1000, 1000) == list(range(1000))
    sections = space_timesteps(300, "10,15,20")
    assert len(sections) == 45 and sections[:2] == [0, 11] and sections[10] == 100 and sections[25] == 200
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(100, 101)
    base = Diffusion.base()
    full = base.respaced(range(1000))  # all steps kept: the base schedule back
    assert full.timestep_map == tuple(range(1000))
    for name, table in base.tables.items():
        np.testing.assert_allclose(full.tables[name], table, rtol=1e-9, err_msg=name)
    sp = base.spaced(250)
    assert sp.num_timesteps == 250 and sp.timestep_map == tuple(kept)
    np.testing.assert_allclose(sp.tables["alphas_cumprod"], ACP[kept], rtol=1e-12)  # ᾱ kept, β recomputed
    np.testing.assert_allclose(sp.tables["betas"], 1 - ACP[kept] / np.concatenate([[1.0], ACP[kept][:-1]]),
                               rtol=1e-12)
    assert torch.equal(sp.model_timesteps(torch.tensor([0, 249])), torch.tensor([0, 999]))


class ToyModel(torch.nn.Module):
    """ε = 0.5·x + 1e-3·t + 0.1·(y+1) (−0.2 for the null class) and v = tanh(x) − 0.1·y/10: elementwise, so each
    channel's sample depends on that channel's outputs only. Records (batch, timestep) per call."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    @staticmethod
    def np_out(x: np.ndarray, t: int, y: np.ndarray) -> np.ndarray:
        lab = np.where(y == 10, -0.2, 0.1 * (y + 1)).reshape(-1, 1, 1, 1)
        return np.concatenate([0.5 * x + 1e-3 * t + lab, np.tanh(x) - 0.01 * y.reshape(-1, 1, 1, 1)], axis=1)

    def forward(self, x, t, y):
        assert x.dtype == torch.float32 and t.dtype == torch.int64 and (t == t[0]).all()
        self.calls.append((x.shape[0], int(t[0])))
        return (torch.from_numpy(self.np_out(x.double().numpy(), int(t[0]), y.numpy())).float(),)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
def test_respaced_sampling_against_the_written_out_update(mode):
    """3 respaced steps (timesteps 999, 500, 0) with per-sample noise, every update written out in numpy."""
    kept = space_timesteps(1000, 3)
    assert kept == [0, 500, 999]
    s = schedule(1 - ACP[kept] / np.concatenate([[1.0], ACP[kept][:-1]]))
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    y = np.array([3, 7])
    model = ToyModel()
    fn = sample_ddpm if mode == "ddpm" else sample_ddim
    got = fn(model, noise, torch.from_numpy(y), steps=3, generator=_gens([11, 12]))
    assert [tm for _, tm in model.calls] == [999, 500, 0]  # the model sees the original timesteps
    x, gens = noise.double().numpy(), _gens([11, 12])
    for i in (2, 1, 0):
        out = ToyModel.np_out(x.astype(np.float32).astype(np.float64), kept[i], y)
        idx = np.full(2, i)
        mean, logvar, x0_hat = np_model_mean_logvar(s, out, x, idx)
        if mode == "ddpm":
            x = mean
            if i > 0:
                eps = np.stack([torch.randn(4, 2, 2, generator=g).double().numpy() for g in gens])
                x = mean + np.exp(0.5 * logvar) * eps
        else:
            ap = col(s["ap"], idx)
            x = np.sqrt(ap) * x0_hat + np.sqrt(1 - ap) * out[:, :4]
    np.testing.assert_allclose(got.numpy(), x, rtol=1e-6, atol=1e-6)


def test_ddim_eta0_with_the_true_eps_recovers_x0():
    """An oracle that returns the ε of a known x0 at the original timestep: every DDIM step predicts x0 exactly,
    so the end is x0. A sampler that fed the model the respaced index (0..49) would land elsewhere."""
    x0 = torch.rand(3, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    acp = torch.from_numpy(ACP)

    def oracle(x, t, y):
        a = acp[t].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt(),)

    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    for steps in (50, 250):
        got = sample_ddim(oracle, noise, torch.zeros(3, dtype=torch.long), steps=steps)
        torch.testing.assert_close(got, x0, rtol=0, atol=1e-4)


def test_sample_ddpm_does_not_depend_on_the_batch_size():
    """Sample i's noise comes from generator i, however the batch is cut (an elementwise model: exact)."""
    noise = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 5, 9, 0, 3])
    kw = dict(steps=12, cfg_scale=2.0, guidance_high=0.6)
    whole = sample_ddpm(ToyModel(), noise, y, generator=_gens(range(20, 25)), **kw)
    parts = torch.cat([sample_ddpm(ToyModel(), noise[a:b], y[a:b], generator=_gens(range(20 + a, 20 + b)), **kw)
                       for a, b in ((0, 2), (2, 5))])
    assert torch.equal(parts, whole)
    shared = sample_ddpm(ToyModel(), noise, y, generator=[torch.Generator().manual_seed(20)] * 5, **kw)
    assert not torch.allclose(shared, whole)


def test_a_released_layout_dit_samples_batch_free():
    """DiT-Debug/2 with random weights in DiT's layout, through both samplers with CFG: batch cuts change only
    float rounding (a transformer's batched matmuls), amplified a little by the 1/sqrt(ᾱ) steps."""
    model = DiT_models["DiT-Debug/2"](input_size=8, num_classes=10)
    g = torch.Generator().manual_seed(0)
    model.load_state_dict({k: 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()},
                          strict=True)
    model.eval()
    noise = torch.randn(4, 4, 8, 8, generator=g)
    y = torch.tensor([1, 5, 9, 0])
    for fn in (sample_ddpm, sample_ddim):
        kw = dict(steps=8, cfg_scale=2.0, guidance_high=0.6)
        whole = fn(model, noise, y, generator=_gens([20, 21, 22, 23]), **kw)
        halves = [fn(model, noise[i:i + 2], y[i:i + 2], generator=_gens([20 + i, 21 + i]), **kw) for i in (0, 2)]
        torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=2e-4)
        assert whole.dtype == torch.float64 and whole.isfinite().all() and whole.abs().max() > 0


def test_cfg_rules_and_the_guidance_interval():
    c, u = torch.full((1, 8, 1, 1), 2.0), torch.zeros(1, 8, 1, 1)
    assert torch.equal(guide(c, u, 3.0, 3)[0, :, 0, 0], torch.tensor([6.0, 6, 6, 2, 2, 2, 2, 2]))
    assert check_guide_channels("3") == 3 and check_guide_channels("all") == "all"
    with pytest.raises(ValueError, match="guide_channels"):
        check_guide_channels(2)
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2, 6])

    def run(scale, rule, high=1.0):
        m = ToyModel()
        return m, sample_ddpm(m, noise, y, steps=10, cfg_scale=scale, guide_channels=rule, guidance_high=high,
                              generator=_gens([1, 2]))
    _, plain = run(1.0, "all")
    _, three = run(4.0, 3)
    m_all, every = run(4.0, "all")
    assert torch.equal(three[:, 3], plain[:, 3])  # DiT's rule: channel 3 (ε and its variance) unguided
    assert (three[:, :3] - plain[:, :3]).abs().min() > 0
    torch.testing.assert_close(every[:, :3], three[:, :3])
    assert (every[:, 3] - plain[:, 3]).abs().min() > 0
    assert all(n == 4 for n, _ in m_all.calls)  # every step doubled for the null class
    m_half, _ = run(4.0, "all", high=0.5)
    assert [(n == 4) for n, _ in m_half.calls] == [tm / 1000 <= 0.5 for _, tm in m_half.calls]  # t/1000 interval
    assert any(n == 4 for n, _ in m_half.calls) and any(n == 2 for n, _ in m_half.calls)


def test_ddpm_repa_loss_uses_q_sample_and_the_model_timesteps():
    seen = {}

    def probe(x_t, t, y):
        seen["x_t"], seen["t"] = x_t, t
        return torch.cat([0.3 * x_t, torch.zeros_like(x_t)], 1), [x_t.flatten(2).transpose(1, 2)]

    x, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    u = torch.tensor([0.0, 0.5, 0.99999])  # the trainer's per-sample U(0, 1) draws
    t = timestep_from_time(u)
    assert t.tolist() == [0, 500, 999] and timestep_from_time(1.0).item() == 999
    zs = [torch.randn(3, 16, 4)]
    out = ddpm_repa_loss(probe, x, torch.zeros(3, dtype=torch.long), zs, t=u, eps=eps, proj_coeff=0.5)
    d = Diffusion.base()
    torch.testing.assert_close(seen["x_t"], d.q_sample(x, t, eps))
    assert torch.equal(seen["t"], t)  # the model is called with integer timesteps
    torch.testing.assert_close(noisy(x, u, eps), seen["x_t"])
    terms = loss_terms(torch.cat([0.3 * seen["x_t"], torch.zeros_like(x)], 1), x, seen["x_t"], t, eps)
    torch.testing.assert_close(out.denoise, terms["loss"].mean())
    torch.testing.assert_close(out.mse + out.vb, out.denoise)
    torch.testing.assert_close(out.total, out.denoise + 0.5 * out.proj)
    torch.testing.assert_close(out.proj, cos_proj_loss([seen["x_t"].flatten(2).transpose(1, 2)], zs))
    again = ddpm_repa_loss(probe, x, torch.zeros(3, dtype=torch.long), zs, t=t, eps=eps, proj_coeff=0.5)
    torch.testing.assert_close(again.total, out.total)  # integer timesteps given directly: the same
    with pytest.raises(ValueError, match="noise schedule"):
        ddpm_repa_loss(probe, x, torch.zeros(3, dtype=torch.long), zs, t=t, eps=eps, path="cosine")


def test_family_entry_points_are_the_samplers():
    noise, y = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(8)), torch.tensor([1, 2])
    kw = dict(steps=5, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0, null_class=10)
    torch.testing.assert_close(ddpm(ToyModel(), noise, y, generator=_gens([1, 2]), heun=True, path="linear", **kw),
                               sample_ddpm(ToyModel(), noise, y, generator=_gens([1, 2]), **kw), rtol=0, atol=0)
    torch.testing.assert_close(ddim(ToyModel(), noise, y, **kw), sample_ddim(ToyModel(), noise, y, **kw),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise schedule"):
        ddim(ToyModel(), noise, y, path="cosine", **kw)
