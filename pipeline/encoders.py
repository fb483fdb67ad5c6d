"""The VAE, the representation encoders (DINOv2, SigLIP, the paper's Table 2 encoders, tiny presets) and the caption
encoders (pipeline/text.py: CLIP's text transformer as U-ViT runs it; the trainer's prompts use the same loader)."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from manifests import SD_VAE_SCALE, SD_VAE_SHIFT
from common import UserError

from . import vit_loaders
from .presets import (ENCODERS, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, TEXT_ENCODERS, TINY_SEED,
                      TINY_VAE_CONFIG, VAES, EncoderSpec, VaeSpec, _check_name, input_size, parse_spec)
from .text import TextEncoder, load_text_encoder, tiny_tokenizer_files

__all__ = ["ENCODERS", "VAES", "Encoder", "EncoderSpec", "VaeSpec", "load_encoder", "load_vae", "parse_spec",
           "vae_meta", "vae_moments", "tiny_state_dict", "IMAGENET_MEAN", "IMAGENET_STD", "SIGLIP_MEAN",
           "SIGLIP_STD", "input_size", "TEXT_ENCODERS", "TextEncoder", "load_text_encoder", "tiny_tokenizer_files"]


def _hub_error(what: str, where: str, e: Exception) -> UserError:
    offline = " (HF_HUB_OFFLINE is set: is it in the cache?)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load {what} from '{where}'{offline}: {msg}")


def load_vae(spec: str = "sd-vae-ft-ema", device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32):
    """Load a diffusers AutoencoderKL by preset name, 'NAME=PATH', or build the seeded tiny or analytic preset."""
    name, path = parse_spec(spec)
    _check_name(name, VAES, "VAE", "--vae")
    preset = VAES[name]
    if preset.analytic:
        if path is not None:
            raise UserError(f"--vae {spec}: {name} is analytic and takes no weights path")
        from .pixel_vae import PixelVAE
        return PixelVAE().to(device=device, dtype=dtype).eval().requires_grad_(False)
    from diffusers import AutoencoderKL
    if preset.tiny and path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            vae = AutoencoderKL(**TINY_VAE_CONFIG)
    else:
        where = path or preset.hub_id
        if path is not None and not os.path.exists(path):
            raise UserError(f"VAE path not found: {path} (--vae {spec})")
        try:
            vae = AutoencoderKL.from_pretrained(where, torch_dtype=dtype)
        except Exception as e:  # noqa: BLE001 - hub/IO errors of many kinds: one line naming the source
            raise _hub_error(f"VAE {name}", where, e) from e
    if next(vae.parameters()).dtype != dtype:
        vae = vae.to(dtype=dtype)
    return vae.to(device=device).eval().requires_grad_(False)


def vae_meta(spec: str) -> dict[str, Any]:
    """The manifest's `latent.vae` record."""
    name, path = parse_spec(spec)
    _check_name(name, VAES, "VAE", "--vae")
    preset = VAES[name]
    weights = "analytic (no weights)" if preset.analytic else path or preset.hub_id or f"random-init(seed={TINY_SEED})"
    return {"name": name, "weights": weights, "scaling_factor": SD_VAE_SCALE, "shift": SD_VAE_SHIFT,
            "pretrained": not (preset.tiny or preset.analytic)}


@torch.no_grad()
def vae_moments(vae, crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops (N, H, W, 3) -> cat([mean, std]) of the posterior, float32 (N, 2C, H/8, W/8)."""
    p = next(vae.parameters())
    x = crops.to(p.device).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]
    dist = vae.encode(x.to(p.dtype).contiguous(memory_format=torch.channels_last)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()  # (N, 8, H/8, W/8)


# ------------------------------------------------------------------------------------------ encoders
def tiny_state_dict(spec: EncoderSpec) -> dict[str, torch.Tensor]:
    """The seeded random 'checkpoint' of a tiny preset, at the real model's native image size."""
    import timm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        native = timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=spec.native_size,
                                   **spec.tiny_kwargs)
    return native.state_dict()


def _resize_rule(spec: EncoderSpec, size: int, resolution: int) -> str:
    """The manifest's record of the pixel pipeline, in REPA train.py's order."""
    if size == resolution:
        return "none: x/255, normalise (input is the crop)"
    if spec.resize_first:
        return f"x/255, bicubic (no antialias) {resolution}->{size}, then normalise"
    return f"x/255, normalise, then bicubic (no antialias) {resolution}->{size}"


class Encoder(torch.nn.Module):
    """uint8 crops -> final-norm patch tokens (N, T, D), without CLS or register tokens."""

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, resolution: int, weights: str):
        super().__init__()
        self.spec, self.model, self.name = spec, model, spec.name
        self.input_size = input_size(spec, resolution)
        self.dim = int(model.embed_dim)
        g = self.input_size // spec.patch_size
        self.grid = (g, g)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.meta = {"name": spec.name, "family": spec.family, "weights": weights, "pretrained": not spec.tiny,
                     "architecture": spec.arch, "input_size": self.input_size, "patch_size": spec.patch_size,
                     "grid": list(self.grid), "mean": list(spec.mean), "std": list(spec.std),
                     "tokens": spec.tokens, "resize": _resize_rule(spec, self.input_size, resolution)}

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) or (N, 3, H, W) -> normalised float (N, 3, S, S), as REPA does online."""
        if crops.shape[-1] == 3 and crops.shape[1] != 3:
            crops = crops.permute(0, 3, 1, 2)  # (N, 3, H, W)
        x = crops.to(self.mean.device, torch.float32) / 255.0  # (N, 3, H, W) in [0, 1]
        if not self.spec.resize_first:
            x = (x - self.mean) / self.std
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                              antialias=False)  # (N, 3, S, S)
        if self.spec.resize_first:  # CLIP: REPA resizes [0, 1] pixels, then normalises
            x = (x - self.mean) / self.std
        return x

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(crops)
        p = next(self.model.parameters())
        tokens = self.model.forward_features(x.to(p.dtype).contiguous(memory_format=torch.channels_last))
        return tokens[:, self.model.num_prefix_tokens:].float()  # (N, T, D)


def load_encoder(spec_str: str, resolution: int = 256, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Encoder:
    """Build an encoder by registry name or 'NAME=PATH' (a timm checkpoint file)."""
    import timm
    name, path = parse_spec(spec_str)
    _check_name(name, ENCODERS, "encoder", "--encoders")
    spec = ENCODERS[name]
    size = input_size(spec, resolution)
    if spec.family in vit_loaders.FAMILIES:  # MoCo v3, MAE, I-JEPA, CLIP, DINO: their official file layouts
        model, weights = vit_loaders.build(spec, size, path, f"--encoders {spec_str}")
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return Encoder(spec, model, resolution, weights).to(device)
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=size, **spec.tiny_kwargs)
    if path is not None:
        if not os.path.exists(path):
            raise UserError(f"encoder weights not found: {path} (--encoders {spec_str})")
        overlay, weights, where = dict(file=path), path, path
    elif spec.tiny:
        overlay, weights, where = dict(state_dict=tiny_state_dict(spec)), f"random-init(seed={TINY_SEED})", name
    else:
        overlay, weights, where = None, f"timm/{spec.arch}.{spec.tag}", f"timm/{spec.arch}.{spec.tag}"
    try:
        # pretrained=True for every preset: timm's checkpoint filter resamples the position embedding
        # (bicubic, antialias) to the requested grid, e.g. DINOv2's 37x37 -> 16x16.
        model = timm.create_model(f"{spec.arch}.{spec.tag}" if spec.tag else spec.arch, pretrained=True,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # noqa: BLE001 - hub/IO errors: one line naming the source
        raise _hub_error(f"encoder {name}", where, e) from e
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Encoder(spec, model, resolution, weights).to(device)
