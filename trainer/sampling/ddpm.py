"""DDPM ancestral and DDIM samplers on DiT's respaced schedule, with classifier-free guidance (DESIGN §9).

The model is called as `model(x, t, y=y)` with x in float32 and t the int64 *original* timesteps (0..999, through
the respaced schedule's `timestep_map`, as DiT `respace.py`'s _WrappedModel does); its first output is ε then, with
learned variance, v (2C channels). The state is float64; sample i's noise comes from its own generator, so the
output does not depend on the batch size (as `sample_sde`).

CFG, two named rules (`guide_channels`), both as DiT's `forward_with_cfg` (ε_u + s·(ε_c − ε_u); the channels it
leaves unguided, the variance ones included, come from the conditional branch):
- "all" (the default): every ε channel, the standard rule;
- 3: only the first three latent channels, the released DiT sampler's rule (`model_out[:, :3]`), kept there "for
  exact reproducibility". This is the rule behind the DiT paper's FIDs (DiT-XL/2 2.27 at scale 1.5).

The guidance interval maps onto the discrete steps through t/T: step i is guided when
guidance_low ≤ timestep_map[i] / T ≤ guidance_high, with T = 1000 the training timesteps; timestep 999 (the
first step) is 0.999, timestep 0 (the last) is 0.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from trainer.objectives.ddpm import NUM_TIMESTEPS, Diffusion, check_schedule
from trainer.sampling.samplers import Generators, _randn_like, guided, null_like

GUIDE_RULES = ("all", 3)


def check_guide_channels(guide_channels: str | int) -> str | int:
    """'all' or 3 (also given as the string '3', as a CLI passes it) -> the rule; ValueError otherwise."""
    rule = int(guide_channels) if isinstance(guide_channels, str) and guide_channels.isdigit() else guide_channels
    if rule not in GUIDE_RULES:
        raise ValueError(f"guide_channels must be one of {GUIDE_RULES}, got {guide_channels!r}")
    return rule


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, channels: int) -> torch.Tensor:
    """u + s·(c − u) on channels [0, channels); the rest (unguided ε, variance) from the conditional output."""
    mixed = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mixed, cond[:, channels:]], dim=1)


def model_output(model: Callable, x: torch.Tensor, timestep: int, y: torch.Tensor, *, cfg_scale: float,
                 use_cfg: bool, guide_channels: str | int, null_class: int | None) -> torch.Tensor:
    """The (guided) model output at one original timestep, float64 (N, 2C or C, H, W)."""
    n = x.shape[0]
    if use_cfg:
        x_in = torch.cat([x, x], 0)  # (2N, C, H, W)
        y_in = torch.cat([y, null_like(y, model, null_class)], 0)  # (2N,)
    else:
        x_in, y_in = x, y
    t_in = torch.full((x_in.shape[0],), timestep, dtype=torch.long, device=x.device)  # (N,) or (2N,)
    out = model(x_in.to(torch.float32), t_in, y=y_in)
    out = (out[0] if isinstance(out, (tuple, list)) else out).to(torch.float64)
    if use_cfg:
        channels = x.shape[1] if guide_channels == "all" else int(guide_channels)
        out = guide(out[:n], out[n:], cfg_scale, channels)
    return out


def _run(step: Callable, model: Callable, noise: torch.Tensor, y: torch.Tensor, steps: int, cfg_scale: float,
         guidance_low: float, guidance_high: float, guide_channels: str | int, null_class: int | None,
         num_timesteps: int, callback: Callable[[int], None] | None) -> torch.Tensor:
    """The loop both samplers share: index S−1 down to 0, the guided output, then `step(out, x, t, is_last)`."""
    rule = check_guide_channels(guide_channels)
    diffusion = Diffusion.base(num_timesteps).spaced(steps)
    x = noise.to(torch.float64)  # (N, C, H, W)
    for k, i in enumerate(range(diffusion.num_timesteps - 1, -1, -1)):
        timestep = diffusion.timestep_map[i]
        use_cfg = guided(timestep / num_timesteps, cfg_scale, guidance_low, guidance_high)
        out = model_output(model, x, timestep, y, cfg_scale=cfg_scale, use_cfg=use_cfg, guide_channels=rule,
                           null_class=null_class)
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)  # (N,) index into the spaced tables
        x = step(diffusion, out, x, t, i == 0)
        if callback is not None:
            callback(k)
    return x


@torch.no_grad()
def sample_ddpm(model: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 250, cfg_scale: float = 1.0,
                guidance_low: float = 0.0, guidance_high: float = 1.0, guide_channels: str | int = "all",
                generator: Generators = None, null_class: int | None = None, clip_denoised: bool = False,
                num_timesteps: int = NUM_TIMESTEPS, callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Ancestral sampling (DiT `p_sample_loop`) over `steps` respaced steps; float64 out.

    x ← mean + σ·ε with the model's (learned-range) variance; the last step (index 0) adds no noise.
    DiT's FID sampler (`sample_ddp.py`) does not clip the predicted x0, hence `clip_denoised=False`.
    """
    def step(d: Diffusion, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, last: bool) -> torch.Tensor:
        p = d.p_mean_variance(out, x, t, clip_denoised)
        if last:
            return p["mean"]
        return p["mean"] + torch.exp(0.5 * p["log_variance"]) * _randn_like(x, generator)

    return _run(step, model, noise, y, steps, cfg_scale, guidance_low, guidance_high, guide_channels, null_class,
                num_timesteps, callback)


@torch.no_grad()
def sample_ddim(model: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 250, eta: float = 0.0,
                cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                guide_channels: str | int = "all", generator: Generators = None, null_class: int | None = None,
                clip_denoised: bool = False, num_timesteps: int = NUM_TIMESTEPS,
                callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """DDIM (DiT `ddim_sample_loop`) over `steps` respaced steps; deterministic at eta=0 (the default).

    x ← sqrt(ᾱ_prev)·x̂0 + sqrt(1 − ᾱ_prev − σ²)·ε̂ + σ·ε with σ = eta·sqrt((1 − ᾱ_prev)/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ_prev);
    the model's variance channels are not used.
    """
    def step(d: Diffusion, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, last: bool) -> torch.Tensor:
        p = d.p_mean_variance(out, x, t, clip_denoised)
        eps = d.predict_eps(x, t, p["pred_x0"])  # re-derived: differs from the output's ε only when clipped
        ab, ab_prev = d.at("alphas_cumprod", t, x), d.at("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = p["pred_x0"] * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
        if last or eta == 0:
            return mean
        return mean + sigma * _randn_like(x, generator)

    return _run(step, model, noise, y, steps, cfg_scale, guidance_low, guidance_high, guide_channels, null_class,
                num_timesteps, callback)


# ---- the entry points a family record names (trainer/models/family.py `Sampler`: one keyword set for all) --------

def ddpm(model: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int, generator: Generators = None,
         heun: bool = False, path: str = "linear", **guidance: Any) -> torch.Tensor:
    """`sample_ddpm` (heun does not apply; `path` is the β schedule, DiT's linear)."""
    check_schedule(path)
    return sample_ddpm(model, noise, y, steps=steps, generator=generator, **guidance)


def ddim(model: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int, generator: Generators = None,
         heun: bool = False, path: str = "linear", **guidance: Any) -> torch.Tensor:
    """`sample_ddim` at eta=0 (deterministic: the generators are not used)."""
    check_schedule(path)
    return sample_ddim(model, noise, y, steps=steps, generator=generator, **guidance)
