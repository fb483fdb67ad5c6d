"""Interpolant paths, time sampling and the REPA training loss (DESIGN §4)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

PATHS = ("linear", "cosine")
PROJ_LOSSES = ("cos", "ntxent")


def alpha_sigma(t: torch.Tensor, path: str = "linear") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """x_t = alpha*x + sigma*eps; returns (alpha, sigma, d alpha/dt, d sigma/dt); t=1 is pure noise."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":  # VP interpolant of the paper's Appendix A
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t), -half_pi * torch.sin(half_pi * t),
                half_pi * torch.cos(half_pi * t))
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def sample_time(n: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U(0, 1) per sample (REPA 'uniform' weighting)."""
    return torch.rand(n, device=device, generator=generator)  # (N,)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x_t, velocity target d/dt x_t) for clean x, noise eps and times t (N,)."""
    a, s, da, ds = (v.view(-1, *([1] * (x.dim() - 1))) for v in alpha_sigma(t, path))
    return a * x + s * eps, da * x + ds * eps  # (N, C, H, W) each


def noisy(x0: torch.Tensor, t: float | torch.Tensor, eps: torch.Tensor, path: str = "linear") -> torch.Tensor:
    """x_t = alpha(t)*x0 + sigma(t)*eps, the model's input at time t (a number, or (N,) per sample).

    The coefficients are computed in float64, then rounded to x0's dtype once, as a Python number would be.
    """
    a, s, _, _ = alpha_sigma(torch.as_tensor(t, dtype=torch.float64), path)
    if a.dim() == 0:
        return float(a) * x0 + float(s) * eps
    shape = (-1, *([1] * (x0.dim() - 1)))
    return a.to(x0.dtype).view(shape) * x0 + s.to(x0.dtype).view(shape) * eps  # (N, C, H, W)


def cos_proj_loss(zs_hat: list[torch.Tensor], zs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over encoders, samples and tokens of -cos(z, z_hat), in fp32 (fp16 here overflowed in REPA)."""
    terms = [-(F.normalize(h.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1).mean()
             for h, z in zip(zs_hat, zs)]  # each a mean over (N, T)
    return torch.stack(terms).mean()


def ntxent_proj_loss(zs_hat: list[torch.Tensor], zs: list[torch.Tensor], tau: float) -> torch.Tensor:
    """NT-Xent per token position: the positive for (n, i) is z[n, i]; the negatives are z[m, i], m != n.

    For each token position i, logits[n, m] = cos(h[n, i], z[m, i]) / tau over the local batch, and the loss is
    cross entropy with target n, averaged over samples, positions and encoders. Same-image tokens at other
    positions are not negatives: neighbouring patches of one image are too alike to be pushed apart.
    """
    terms = []
    for h, z in zip(zs_hat, zs):
        h = F.normalize(h.float(), dim=-1).transpose(0, 1)  # (T, N, D)
        z = F.normalize(z.float(), dim=-1).transpose(0, 1)  # (T, N, D)
        logits = h @ z.transpose(1, 2) / tau  # (T, N, N)
        target = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)  # (T, N)
        terms.append(F.cross_entropy(logits.reshape(-1, h.shape[1]), target.reshape(-1)))
    return torch.stack(terms).mean()


@dataclass
class LossOut:
    total: torch.Tensor
    denoise: torch.Tensor
    proj: torch.Tensor


def repa_loss(model, x: torch.Tensor, y: torch.Tensor, zs: list[torch.Tensor], *, path: str = "linear",
              proj_coeff: float = 0.5, proj_loss: str = "cos", ntxent_tau: float = 0.1,
              amp: Callable[[], ContextManager] = contextlib.nullcontext, t: torch.Tensor | None = None,
              eps: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> LossOut:
    """Denoising MSE on the velocity plus proj_coeff * alignment of the projector outputs with `zs`.

    The trainer passes `t`, `eps` and the label `drop` drawn per sample (trainer/loop/steprng.py), so a compiled
    model sees the same randomness as an eager one; without them they are drawn here from the global RNG.
    """
    def forward(x_t: torch.Tensor, t: torch.Tensor):
        return model(x_t, t, y) if drop is None else model(x_t, t, y, force_drop_ids=drop)
    return _interpolant_loss(forward, x, zs, path=path, proj_coeff=proj_coeff, proj_loss=proj_loss,
                             ntxent_tau=ntxent_tau, amp=amp, t=t, eps=eps)


def with_empty_context(context: torch.Tensor, drop: torch.Tensor | None,
                       null_context: torch.Tensor | None) -> torch.Tensor:
    """Classifier-free dropout for captions: rows with `drop` (N,) get the empty caption's context (L, D)."""
    if drop is None:
        return context  # (N, L, D)
    if null_context is None:
        raise ValueError("caption dropout needs the empty caption's context (null_context)")
    return torch.where(drop.view(-1, 1, 1), null_context.to(context.dtype), context)  # (N, L, D)


def context_repa_loss(model, x: torch.Tensor, y: torch.Tensor, zs: list[torch.Tensor], *, path: str = "linear",
                      proj_coeff: float = 0.5, proj_loss: str = "cos", ntxent_tau: float = 0.1,
                      amp: Callable[[], ContextManager] = contextlib.nullcontext, t: torch.Tensor | None = None,
                      eps: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                      null_context: torch.Tensor | None = None) -> LossOut:
    """`repa_loss` for a caption-conditioned model (MMDiT; REPA train_t2i.py: linear path, v-prediction, REPA on
    the image tokens): `y` is the context (N, L, D), called as `model(x_t, t, context=...)`, and rows with
    `drop` see `null_context` (L, D), the empty caption's (REPA dataset.py CFGDataset, p_uncond 0.1)."""
    context = with_empty_context(y, drop, null_context)  # (N, L, D)

    def forward(x_t: torch.Tensor, t: torch.Tensor):
        return model(x_t, t, context=context)
    return _interpolant_loss(forward, x, zs, path=path, proj_coeff=proj_coeff, proj_loss=proj_loss,
                             ntxent_tau=ntxent_tau, amp=amp, t=t, eps=eps)


def _interpolant_loss(forward: Callable, x: torch.Tensor, zs: list[torch.Tensor], *, path: str, proj_coeff: float,
                      proj_loss: str, ntxent_tau: float, amp: Callable[[], ContextManager],
                      t: torch.Tensor | None, eps: torch.Tensor | None) -> LossOut:
    """The shared body: forward(x_t, t) -> (v_hat, zs_hat) is the conditioned model."""
    n = x.shape[0]
    t = sample_time(n, x.device) if t is None else t  # (N,)
    eps = torch.randn_like(x) if eps is None else eps  # (N, C, H, W)
    x_t, v = interpolate(x, eps, t, path)
    with amp():  # autocast covers the model only; the losses below are fp32
        v_hat, zs_hat = forward(x_t, t)
    denoise = ((v_hat.float() - v) ** 2).mean()
    if zs:
        proj = cos_proj_loss(zs_hat, zs) if proj_loss == "cos" else ntxent_proj_loss(zs_hat, zs, ntxent_tau)
    else:
        proj = torch.zeros((), device=x.device)
    return LossOut(denoise + proj_coeff * proj, denoise, proj)
