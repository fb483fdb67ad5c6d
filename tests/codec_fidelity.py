"""Token-codec fidelity against the float32 tokens of the same images (shared by tests and bench_codecs.py).

Real DINOv2 weights are not available offline, so the tokens come from encoders with the real code path and
architecture but random weights: the pipeline's `tiny-dinov2` preset, or timm's ViT-B/14 DINOv2 architecture
(`vit_base_patch14_dinov2`, random init, seed 0) on the embedded synthetic images, final-norm patch tokens.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from manifests.codecs import decode, encode, get_codec


def synth_crops(n: int, seed: int = 0, resolution: int = 256) -> np.ndarray:
    """(n, R, R, 3) uint8 ADM crops of the embedded synthetic dataset (as `pipeline extract` sees them)."""
    from pipeline.synth import synthesize
    from pipeline.transforms import decode_crop
    with tempfile.TemporaryDirectory() as tmp:
        classes = max(1, min(n, 8))
        paths = sorted(synthesize(tmp, classes=classes, per_class=-(-n // classes), seed=seed))[:n]
        return np.stack([decode_crop(Path(p).read_bytes(), resolution)[0] for p in paths])


def encoder_tokens(crops: np.ndarray, name: str = "tiny-dinov2", batch: int = 8) -> torch.Tensor:
    """float32 patch tokens (N, T, D) of the crops: `tiny-dinov2` (pipeline preset) or `vit-b-random`."""
    from pipeline.encoders import Encoder, load_encoder
    if name == "vit-b-random":
        import timm

        from pipeline.presets import ENCODERS, input_size
        spec = ENCODERS["dinov2-vit-b"]
        torch.manual_seed(0)
        model = timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=input_size(spec, 256))
        enc = Encoder(spec, model.eval().requires_grad_(False), 256, "random-init(seed=0)")
    else:
        enc = load_encoder(name, 256)
    x = torch.from_numpy(crops)
    with torch.no_grad():
        return torch.cat([enc(x[i:i + batch]).float() for i in range(0, len(x), batch)])  # (N, T, D)


def roundtrip(ref: torch.Tensor, codec: str) -> torch.Tensor:
    """What a reader gets back after storing `ref` with `codec`, as float32."""
    c = get_codec(codec)
    q, s = encode(ref, c)
    return decode(q, s, c)


def token_cosine(ref: torch.Tensor, dec: torch.Tensor) -> tuple[float, float]:
    """(min, mean) over every token of cos(ref, decoded), in float64."""
    cos = torch.nn.functional.cosine_similarity(ref.double(), dec.double(), dim=-1)  # (N, T)
    return float(cos.min()), float(cos.mean())


def fixed_projector_outputs(ref: torch.Tensor, hidden: int = 256, noise: float = 1.0, seed: int = 0) -> torch.Tensor:
    """z_hat of a fixed, partly trained projector: hidden states carry a noisy linear image of the tokens, and a
    linear projector is fitted to them by least squares once. A random projector would give cos ~ 0 and an
    ill-conditioned relative error; this gives a REPA loss near the -0.5 to -0.8 of real runs."""
    g = torch.Generator().manual_seed(seed)
    n, t, d = ref.shape
    flat = ref.reshape(-1, d).double()  # (N*T, D)
    w = torch.randn(d, hidden, generator=g, dtype=torch.float64) / d ** 0.5
    h = flat @ w
    h = h + noise * h.std() * torch.randn(h.shape, generator=g, dtype=torch.float64)  # (N*T, H)
    proj = torch.linalg.lstsq(h, flat).solution  # (H, D)
    return (h @ proj).reshape(n, t, d).float()  # (N, T, D)


def repa_loss_error(ref: torch.Tensor, dec: torch.Tensor) -> tuple[float, float, float]:
    """(loss on fp32 tokens, loss on decoded tokens, relative error) of the trainer's cosine REPA loss."""
    from trainer.objectives.interpolant import cos_proj_loss
    z_hat = fixed_projector_outputs(ref)
    a = float(cos_proj_loss([z_hat], [ref]))
    b = float(cos_proj_loss([z_hat], [dec]))
    return a, b, abs(b - a) / abs(a)


def tokens_cknna(ref: torch.Tensor, dec: torch.Tensor, num: int = 1024, k: int = 10, seed: int = 0) -> float:
    """CKNNA (evaluation.align.cknna) between fp32 and decoded tokens over `num` random tokens of the set."""
    from evaluation.align import cknna
    flat_a, flat_b = ref.reshape(-1, ref.shape[-1]), dec.reshape(-1, dec.shape[-1])
    idx = torch.randperm(flat_a.shape[0], generator=torch.Generator().manual_seed(seed))[:num]
    return float(cknna(flat_a[idx], flat_b[idx], k=k))


def pooled_cknna(ref: torch.Tensor, dec: torch.Tensor, k: int = 10) -> float:
    """CKNNA over images of the token-averaged features, as `evaluation align` pools them."""
    from evaluation.align import cknna
    return float(cknna(ref.mean(1), dec.mean(1), k=k))


def fidelity(ref: torch.Tensor, codec: str, token_cknna: bool = True) -> dict[str, float]:
    """Every fidelity figure of one codec against the float32 tokens `ref` (N, T, D)."""
    dec = roundtrip(ref, codec)
    cmin, cmean = token_cosine(ref, dec)
    l32, lq, rel = repa_loss_error(ref, dec)
    return {"cos_min": cmin, "cos_mean": cmean, "loss_fp32": l32, "loss_codec": lq, "loss_rel_err": rel,
            "cknna_pooled": pooled_cknna(ref, dec),
            "cknna_tokens": tokens_cknna(ref, dec) if token_cknna else float("nan")}


def outlier_tokens(n: int, t: int, d: int, ratio: float, channels: int = 2, seed: int = 0) -> torch.Tensor:
    """Gaussian tokens whose `channels` outlier channels are `ratio` times larger (a stress case, not real data)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g)
    x[..., :channels] *= ratio
    return x
