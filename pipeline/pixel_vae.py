"""`pixel-vae`: an analytic, weight-free 'autoencoder' for CPU demos (area-downsample + colour transform).

A crop (N, 3, R, R) in [-1, 1] is area-averaged to (R/8, R/8) and mapped by a fixed 4x3 colour transform
(luma, two opponent-colour axes, and a red-blue axis) into 4 latent channels; decoding applies the
transform's pseudo-inverse and upsamples bicubically. Nothing is learned, so a CPU-trained SiT's samples
show what the SiT itself learned (a random tiny VAE would decode anything to noise). It exposes the
slice of diffusers' AutoencoderKL that the pipeline and the sampler use: `encode(x).latent_dist.{mean,std}`,
`decode(z).sample`, `config.latent_channels`, and `parameters()` for device/dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from manifests import SD_VAE_SCALE

FACTOR = 8  # the SD VAE's downsampling factor: the latent grid has the real geometry
# Rows: luma (BT.601), blue-yellow and red-green opponent axes, red-blue. Full column rank, so the
# pseudo-inverse recovers RGB exactly from a noise-free latent.
COLOUR = ((0.299, 0.587, 0.114), (-0.169, -0.331, 0.5), (0.5, -0.419, -0.081), (0.5, 0.0, -0.5))
# Latents are stored pre-divided by SD's scaling factor, so the trainer's z*0.18215 (DESIGN §3) lands at
# about unit scale, like the SD VAE's latents do.
GAIN = 3.0
POSTERIOR_STD = 0.02  # a small, fixed posterior spread (in scaled units): the trainer's draw stays near the mean


@dataclass
class _Posterior:
    mean: torch.Tensor
    std: torch.Tensor


class PixelVAE(torch.nn.Module):
    """Weight-free stand-in for AutoencoderKL (see the module docstring)."""

    def __init__(self):
        super().__init__()
        m = torch.tensor(COLOUR, dtype=torch.float32)  # (4, 3)
        # Fixed, not learned; a Parameter (frozen) only so .to(), .parameters() and dtype work as for a VAE.
        self.colour = torch.nn.Parameter(m, requires_grad=False)
        self.register_buffer("inverse", torch.linalg.pinv(m), persistent=False)  # (3, 4)
        self.config = SimpleNamespace(latent_channels=4, scaling_factor=SD_VAE_SCALE, downsample=FACTOR)

    def _apply(self, fn, recurse=True):  # keep the pseudo-inverse in step with the transform's dtype/device
        out = super()._apply(fn, recurse)
        self.inverse = torch.linalg.pinv(self.colour.detach().float()).to(self.colour.dtype)
        return out

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        """(N, 3, H, W) in [-1, 1] -> posterior with mean and std (N, 4, H/8, W/8)."""
        h, w = x.shape[-2:]
        small = F.adaptive_avg_pool2d(x.contiguous(), (h // FACTOR, w // FACTOR))  # (N, 3, h, w) area average
        z = torch.einsum("kc,nchw->nkhw", self.colour.to(small.dtype), small) * (GAIN / SD_VAE_SCALE)  # (N, 4, h, w)
        std = torch.full_like(z, POSTERIOR_STD / SD_VAE_SCALE)
        return SimpleNamespace(latent_dist=_Posterior(mean=z, std=std))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        """(N, 4, h, w) unscaled latents -> (N, 3, 8h, 8w) in about [-1, 1]."""
        small = torch.einsum("ck,nkhw->nchw", self.inverse.to(z.dtype), z.contiguous()) * (SD_VAE_SCALE / GAIN)
        h, w = small.shape[-2:]
        x = F.interpolate(small, size=(h * FACTOR, w * FACTOR), mode="bicubic", align_corners=False)  # (N, 3, H, W)
        return SimpleNamespace(sample=x.clamp(-1.0, 1.0))


__all__ = ["PixelVAE", "COLOUR", "GAIN", "FACTOR"]
