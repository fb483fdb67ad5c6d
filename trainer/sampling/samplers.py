"""SDE (Euler–Maruyama) and ODE (Euler/Heun) samplers with a CFG guidance interval, as in the REPA reference.

Time runs from t=1 (noise) to t=0 (data). The state is float64; the model is called in float32 as
`model(x, t, y=y)` and its first output is the velocity. Both samplers follow the training path
(`linear` or `cosine`) through `trainer.objectives.interpolant.alpha_sigma`. `sde` and `ode` are the SiT family's
sampler entry points (trainer/models/family.py `Sampler`); `sample_generator` gives sample i its own noise.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from trainer.objectives.interpolant import PATHS, alpha_sigma

# REPA samplers.py: the SDE integrates linspace(1, SDE_T_LAST, N), then one deterministic mean step to 0.
SDE_T_LAST = 0.04

Generators = torch.Generator | Sequence[torch.Generator] | None


def diffusion_coeff(t: float) -> float:
    """w(t) = 2t: the SDE's diffusion (REPA samplers.py `compute_diffusion`)."""
    return 2.0 * t


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float, path: str = "linear") -> torch.Tensor:
    """Score ∇log p_t(x) from the velocity: x = αx₀ + σε, v = α'x₀ + σ'ε; eliminate x₀, then s = −ε/σ."""
    coeffs = alpha_sigma(torch.tensor([t], dtype=torch.float64), path)
    alpha, sigma, d_alpha, d_sigma = (float(torch.as_tensor(a).reshape(-1)[0]) for a in coeffs)
    ratio = alpha / d_alpha
    var = sigma * sigma - ratio * d_sigma * sigma  # = σ(σ − (α/α')σ'), the ε coefficient times −σ
    return (ratio * v - x) / var


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, index) through SeedSequence, so nearby indices are uncorrelated."""
    a, b = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(a) << 32) | int(b))


def _null_class(model: Callable, null_class: int | None) -> int:
    if null_class is not None:
        return int(null_class)
    n = getattr(model, "num_classes", None)
    if n is None:
        raise ValueError("CFG needs the null class: pass null_class= or give the model a num_classes attribute")
    return int(n)


def null_like(y: torch.Tensor, model: Callable, null: int | torch.Tensor | None) -> torch.Tensor:
    """The unconditional half of a CFG batch: the null label for labels y (N,), or, for caption contexts
    y (N, L, D), the empty caption's context `null` (L, D) on every row (text families pass it as null_class)."""
    if torch.is_tensor(null) and null.ndim > 0:
        return null.to(device=y.device, dtype=y.dtype).expand_as(y)  # (N, L, D)
    return torch.full_like(y, _null_class(model, None if null is None else int(null)))  # (N,)


def guided(t: float, cfg_scale: float, guidance_low: float, guidance_high: float) -> bool:
    """CFG applies at time t only inside [guidance_low, guidance_high] (REPA guidance interval)."""
    return cfg_scale > 1.0 and guidance_low <= t <= guidance_high


def velocity(model: Callable, x: torch.Tensor, t: float, y: torch.Tensor, *, cfg_scale: float,
             guidance_low: float, guidance_high: float, null_class: int | None, guide_at: float | None = None
             ) -> torch.Tensor:
    """The (guided) velocity at time t in float64; the unconditional half is only run inside the interval.

    `guide_at` is the time that decides the interval (the reference's Heun correction uses t_cur, not t_next).
    """
    n = x.shape[0]
    use_cfg = guided(t if guide_at is None else guide_at, cfg_scale, guidance_low, guidance_high)
    if use_cfg:
        x_in = torch.cat([x, x], 0)  # (2N, C, H, W)
        y_in = torch.cat([y, null_like(y, model, null_class)], 0)  # (2N,) labels or (2N, L, D) contexts
    else:
        x_in, y_in = x, y
    t_in = torch.full((x_in.shape[0],), t, dtype=torch.float32, device=x.device)  # (N,) or (2N,)
    out = model(x_in.to(torch.float32), t_in, y=y_in)
    v = (out[0] if isinstance(out, (tuple, list)) else out).to(torch.float64)
    if use_cfg:
        cond, uncond = v[:n], v[n:]
        # u + s·(c − u) on all channels (the DiT reference guided only 3 of 4). REPA's SDE guides the drift
        # v − ½w·s(v) instead; that map is affine in v for a shared x, so guiding v first is the same thing.
        v = uncond + cfg_scale * (cond - uncond)
    return v


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise like x; a list of generators draws sample i from generators[i] (batch-size free)."""
    if generator is None:
        return torch.randn(x.shape, dtype=torch.float32, device=x.device).to(torch.float64)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, dtype=torch.float32, generator=generator,
                           device=generator.device).to(x.device, torch.float64)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    eps = torch.stack([torch.randn(x.shape[1:], dtype=torch.float32, generator=g, device=g.device)
                       for g in generator])  # (N, C, H, W)
    if x.is_cuda and not eps.is_cuda:  # pinned + non_blocking: the copy doesn't stall the GPU queue each step
        eps = eps.pin_memory().to(x.device, non_blocking=True)
    return eps.to(x.device, torch.float64)


def sde_time_grid(steps: int) -> torch.Tensor:
    """linspace(1, 0.04, steps) followed by 0: steps+1 points, float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.cat([torch.linspace(1.0, SDE_T_LAST, steps, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64)])


def ode_time_grid(steps: int) -> torch.Tensor:
    """linspace(1, 0, steps+1), float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


@torch.no_grad()
def sample_sde(model: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 250, cfg_scale: float = 1.0,
               guidance_low: float = 0.0, guidance_high: float = 1.0, generator: Generators = None,
               path: str = "linear", null_class: int | None = None,
               callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Euler–Maruyama from t=1 to 0.04, then a deterministic mean step to 0; `steps` model calls; float64 out."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    grid = sde_time_grid(steps).tolist()
    x = noise.to(torch.float64)  # (N, C, H, W)
    kw = dict(cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high, null_class=null_class)
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur  # negative: time runs backwards
        v = velocity(model, x, t_cur, y, **kw)
        w = diffusion_coeff(t_cur)
        drift = v - 0.5 * w * score_from_velocity(v, x, t_cur, path)
        if i < steps - 1:
            eps = _randn_like(x, generator)
            x = x + drift * dt + (w ** 0.5) * (abs(dt) ** 0.5) * eps
        else:
            x = x + drift * dt  # the last step (0.04 -> 0) is the noise-free mean
        if callback is not None:
            callback(i)
    return x


@torch.no_grad()
def sample_ode(model: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 50, cfg_scale: float = 1.0,
               guidance_low: float = 0.0, guidance_high: float = 1.0, heun: bool = False, path: str = "linear",
               null_class: int | None = None, callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Euler (or Heun) on the probability-flow ODE over linspace(1, 0, steps+1); float64 out.

    As in the reference, Heun skips the correction on the final step to t=0 (NFE 2·steps − 1), and its
    correction is guided exactly when the predictor step was (decided at t_cur).
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    grid = ode_time_grid(steps).tolist()
    x = noise.to(torch.float64)  # (N, C, H, W)
    kw = dict(cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high, null_class=null_class)
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        d_cur = velocity(model, x, t_cur, y, **kw)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < steps - 1:
            d_next = velocity(model, x_next, t_next, y, guide_at=t_cur, **kw)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
        if callback is not None:
            callback(i)
    return x


def nfe(mode: str, steps: int, heun: bool = False) -> int:
    """Model evaluations per sample (not counting the CFG doubling)."""
    if mode == "sde":
        return steps
    return 2 * steps - 1 if heun else steps


# ---- the SiT family's entry points (one keyword set for every family's samplers) ---------------------------------

def _all_channels(guide_channels: str) -> None:
    if str(guide_channels) != "all":
        raise ValueError(f"the SiT samplers guide all channels; guide_channels {guide_channels!r} is DiT's rule")


def sde(model: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int, generator: Generators = None,
        heun: bool = False, guide_channels: str = "all", **guidance: Any) -> torch.Tensor:
    """`sample_sde` (heun does not apply)."""
    _all_channels(guide_channels)
    return sample_sde(model, noise, y, steps=steps, generator=generator, **guidance)


def ode(model: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int, generator: Generators = None,
        heun: bool = False, guide_channels: str = "all", **guidance: Any) -> torch.Tensor:
    """`sample_ode` (deterministic: the generators are not used)."""
    _all_channels(guide_channels)
    return sample_ode(model, noise, y, steps=steps, heun=heun, **guidance)
