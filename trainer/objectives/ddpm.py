"""DiT's DDPM objective: `create_diffusion()` defaults (facebookresearch/DiT `diffusion/`; DESIGN §9).

1000 steps, the linear β schedule 1e-4..0.02 (scaled by 1000/T), ε-prediction, learned-range variance
(log σ² = v'·log β_t + (1 − v')·log β̃_t with v' = (v + 1)/2), and the hybrid loss MSE(ε) + VB, where VB sees the
detached mean: the KL from the true posterior in bits for t > 0, the discretised Gaussian decoder NLL at t = 0.
Timesteps are uniform over 0..T−1. A respaced schedule (`Diffusion.respaced`, DiT `respace.py`) keeps a subset of
the timesteps and recomputes β from the kept ᾱ; the model is still called with the original timestep numbers.

The schedule tables are float64 (as DiT's numpy arrays); the terms are computed in the inputs' dtype promoted to
at least float32 (DiT extracts its coefficients as float32).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from trainer.objectives.interpolant import LossOut, cos_proj_loss, ntxent_proj_loss

NUM_TIMESTEPS = 1000  # DiT create_diffusion(diffusion_steps=1000)
BETA_START, BETA_END = 1e-4, 0.02  # Ho et al.'s linear schedule at T=1000 (DiT get_named_beta_schedule "linear")
SCHEDULES = ("linear",)  # the `path` (β schedule) values; DiT's default. (IDDPM's cosine is not built.)
BIN_HALF_WIDTH = 1.0 / 255.0  # decoder NLL bins: uint8 data rescaled to [-1, 1] (DiT diffusion_utils)
EDGE = 0.999  # |x0| beyond this takes the open-ended edge bin


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """β_t linear from 1e-4 to 0.02, both scaled by 1000/T so other T keep the same overall noise (float64)."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The kept timesteps (sorted): T split into len(counts) equal sections, each strided to its count.

    `250` keeps 250 of 1000 evenly, both ends included; "10,15,20" strides three sections differently.
    """
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        counts = [int(c) for c in section_counts.split(",")]
    else:
        counts = [int(c) for c in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride  # accumulated, not j*stride: DiT's rounding of each index, to the last bit
        start += size
    return sorted(set(kept))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
              ) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation that DiT (after IDDPM) uses; kept so the VB values match theirs."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
                                        ) -> torch.Tensor:
    """log P(bin of x) under N(means, e^(2·log_scales)), bins of width 2/255 on [-1, 1], open at the edges (nats)."""
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - means + BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - means - BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_one_minus_cdf_min, log_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


class Diffusion:
    """A Gaussian diffusion over `betas`; `timestep_map[i]` is the model's timestep for index i (respacing)."""

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None):
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or not ((b > 0) & (b <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = len(b)
        self.timestep_map = tuple(range(len(b)) if timestep_map is None else (int(t) for t in timestep_map))
        if len(self.timestep_map) != len(b):
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {len(b)} betas")
        acp = np.cumprod(1.0 - b)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = b * (1.0 - acp_prev) / (1.0 - acp)  # β̃_t; 0 at t=0
        # β̃_0 = 0 has no log: the clipped table repeats β̃_1 there (DiT posterior_log_variance_clipped).
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(b)
        self.tables: dict[str, np.ndarray] = {
            "betas": b, "log_betas": np.log(b), "alphas_cumprod": acp, "alphas_cumprod_prev": acp_prev,
            "sqrt_alphas_cumprod": np.sqrt(acp), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
            "posterior_variance": post_var, "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": b * np.sqrt(acp_prev) / (1.0 - acp),
            "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(1.0 - b) / (1.0 - acp),
            # fixed-large variance (models without learn_sigma): β_t, with β̃_1 at t=0 for a better decoder NLL
            "log_fixed_large": np.log(np.append(post_var[1] if len(b) > 1 else b[0], b[1:])),
            "timestep_map": np.asarray(self.timestep_map, dtype=np.int64),
        }
        self._device_tables: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def base(cls, num_timesteps: int = NUM_TIMESTEPS) -> "Diffusion":
        """DiT's training diffusion: the linear schedule over all timesteps."""
        return cls(linear_betas(num_timesteps))

    def respaced(self, use_timesteps: Sequence[int]) -> "Diffusion":
        """Keep `use_timesteps` (of this schedule) and recompute β from the kept ᾱ: β'_i = 1 − ᾱ_i / ᾱ_prev-kept."""
        keep = sorted(set(int(t) for t in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps to keep must lie in [0, {self.num_timesteps})")
        acp = self.tables["alphas_cumprod"][keep]
        betas = 1.0 - acp / np.append(1.0, acp[:-1])
        return Diffusion(betas, [self.timestep_map[t] for t in keep])

    def spaced(self, steps: int | str | Sequence[int]) -> "Diffusion":
        """`respaced(space_timesteps(T, steps))`: e.g. `Diffusion.base().spaced(250)` is DiT's sampler schedule."""
        return self.respaced(space_timesteps(self.num_timesteps, steps))

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        table = self._device_tables.get(key)
        if table is None:  # one copy per device, so a training step does no host-to-device table transfer
            table = self._device_tables[key] = torch.from_numpy(self.tables[name]).to(device)
        return table

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at indices t (N,), shaped (N, 1, ...) to broadcast against `like`, in like's dtype."""
        return self._table(name, t.device)[t.long()].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices (N,) -> the timesteps the model is called with (the identity unless respaced), int64."""
        return self._table("timestep_map", t.device)[t.long()]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε."""
        return self.at("sqrt_alphas_cumprod", t, x0) * x0 + self.at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t−1} | x_t, x0): (mean, variance, clipped log variance), each shaped like x_t."""
        mean = self.at("posterior_mean_coef1", t, x_t) * x0 + self.at("posterior_mean_coef2", t, x_t) * x_t
        var = self.at("posterior_variance", t, x_t).expand_as(x_t)
        return mean, var, self.at("posterior_log_variance_clipped", t, x_t).expand_as(x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = x_t / sqrt(ᾱ_t) − sqrt(1/ᾱ_t − 1)·ε."""
        return self.at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self.at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The inverse of `predict_x0`."""
        return (self.at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self.at("sqrt_recipm1_alphas_cumprod", t,
                                                                                     x_t)

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """p(x_{t−1} | x_t) from the model output (N, 2C or C, H, W): mean, log_variance, pred_x0, eps.

        2C channels: ε then v in [−1, 1], log σ² = v'·log β_t + (1 − v')·log β̃_t (learned range). C channels: ε
        with DiT's fixed-large variance (its `learn_sigma=False` default).
        """
        c = x_t.shape[1]
        if model_output.shape[1] == 2 * c:
            eps, v = model_output[:, :c], model_output[:, c:]
            frac = (v + 1) / 2
            log_var = frac * self.at("log_betas", t, x_t) + (1 - frac) * self.at("posterior_log_variance_clipped",
                                                                                 t, x_t)
        elif model_output.shape[1] == c:
            eps, log_var = model_output, self.at("log_fixed_large", t, x_t).expand_as(x_t)
        else:
            raise ValueError(f"model output has {model_output.shape[1]} channels; expected {c} or {2 * c}")
        pred_x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    def vb_terms(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                 ) -> torch.Tensor:
        """Per-sample VB term in bits (N,): decoder NLL where t == 0, else KL(q(x_{t−1}|x_t,x0) || p)."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def loss_terms(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample (N,) `mse` (of ε), `vb` (variance only: the mean is detached) and `loss` = mse + vb.

        As DiT's `training_losses` with the MSE loss type: without learned variance, vb is 0.
        """
        dtype = torch.promote_types(x0.dtype, torch.float32)
        out, x0, x_t, noise = (a.to(dtype) for a in (model_output, x0, x_t, noise))
        c = x0.shape[1]
        eps = out[:, :c]
        mse = mean_flat((noise - eps) ** 2)
        if out.shape[1] == 2 * c:
            # The VB term trains the variance only: it must not pull the ε prediction (IDDPM §3.1).
            vb = self.vb_terms(torch.cat([eps.detach(), out[:, c:]], dim=1), x0, x_t, t)
        else:
            vb = torch.zeros_like(mse)
        return {"mse": mse, "vb": vb, "loss": mse + vb}


@functools.lru_cache(maxsize=None)
def base_diffusion(num_timesteps: int = NUM_TIMESTEPS) -> Diffusion:
    """The shared training schedule (its device tables are made once)."""
    return Diffusion.base(num_timesteps)


def loss_terms(model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor, diffusion: Diffusion | None = None) -> dict[str, torch.Tensor]:
    """DiT's per-sample `mse`, `vb` and `loss` for the model's output at (x_t, t), x_t = q_sample(x0, t, noise)."""
    return (diffusion or base_diffusion()).loss_terms(model_output, x0, x_t, t, noise)


def check_schedule(path: str) -> None:
    """The β schedule is the family's `--path`; DiT's create_diffusion default, "linear", is the one built here."""
    if path not in SCHEDULES:
        raise ValueError(f"unknown DDPM noise schedule {path!r}; expected one of {SCHEDULES}")


def sample_timesteps(n: int, device: torch.device | str, num_timesteps: int = NUM_TIMESTEPS,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """t uniform over 0..T−1 (DiT's UniformSampler), int64 (N,)."""
    return torch.randint(0, num_timesteps, (n,), device=device, generator=generator)


def timestep_from_time(t: torch.Tensor | float, num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """Time in [0, 1] -> timestep floor(t·T), clamped to T−1, int64.

    A draw t ~ U[0, 1) gives DiT's uniform timesteps (so the trainer's per-sample U(0, 1) draws serve), and a
    stated time maps as the sampler's guidance interval does (timestep/T): t = 0.5 is timestep 500.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    return (t * num_timesteps).floor().long().clamp_(0, num_timesteps - 1)


def noisy(x0: torch.Tensor, t: torch.Tensor | float, eps: torch.Tensor, path: str = "linear") -> torch.Tensor:
    """x_t at time t in [0, 1] (a number, or (N,) per sample): q_sample at `timestep_from_time(t)`."""
    check_schedule(path)
    steps = timestep_from_time(t).to(x0.device).expand(x0.shape[0])  # (N,)
    return base_diffusion().q_sample(x0, steps, eps)


@dataclass
class DDPMLossOut(LossOut):
    """LossOut (total, denoise = mean of mse + vb, proj) plus the batch means of the two DDPM terms."""
    mse: torch.Tensor
    vb: torch.Tensor


def ddpm_repa_loss(model, x: torch.Tensor, y: torch.Tensor, zs: list[torch.Tensor], *, path: str = "linear",
                   proj_coeff: float = 0.5, proj_loss: str = "cos", ntxent_tau: float = 0.1,
                   amp: Callable[[], ContextManager] = contextlib.nullcontext, t: torch.Tensor | None = None,
                   eps: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                   diffusion: Diffusion | None = None) -> DDPMLossOut:
    """DiT's hybrid loss (mse + vb, batch mean) plus proj_coeff * alignment; `repa_loss`'s keywords.

    `t` (N,): integer timesteps indexing `diffusion` (default: all 1000, as DiT trains), or times in [0, 1)
    (the trainer's per-sample U(0, 1) draws), mapped by `timestep_from_time`. With t, eps and drop left out
    they are drawn here from the global RNG.
    """
    check_schedule(path)
    d = diffusion or base_diffusion()
    n = x.shape[0]
    if t is None:
        t = sample_timesteps(n, x.device, d.num_timesteps)  # (N,)
    elif t.is_floating_point():
        t = timestep_from_time(t, d.num_timesteps).to(x.device)  # (N,)
    eps = torch.randn_like(x) if eps is None else eps  # (N, C, H, W)
    x_t = d.q_sample(x, t, eps)
    with amp():  # autocast covers the model only; the terms below are fp32
        t_model = d.model_timesteps(t)  # (N,)
        out, zs_hat = model(x_t, t_model, y) if drop is None else model(x_t, t_model, y, force_drop_ids=drop)
    terms = d.loss_terms(out, x, x_t, t, eps)
    denoise = terms["loss"].mean()
    if zs:
        proj = cos_proj_loss(zs_hat, zs) if proj_loss == "cos" else ntxent_proj_loss(zs_hat, zs, ntxent_tau)
    else:
        proj = torch.zeros((), device=x.device)
    return DDPMLossOut(denoise + proj_coeff * proj, denoise, proj, terms["mse"].mean(), terms["vb"].mean())
