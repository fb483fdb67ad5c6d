"""Model presets by name (no torch import: the driver validates names before any heavy import)."""
from __future__ import annotations

from dataclasses import dataclass, field

from manifests import SD_VAE_SCALE
from common import UserError

# ImageNet statistics (timm IMAGENET_DEFAULT_MEAN/STD), used by DINOv2 and by REPA's preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SigLIP normalises to [-1, 1]. Hard-coded: a randomly initialised open_clip model reports CLIP's values.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# OpenAI CLIP statistics (REPA train.py CLIP_DEFAULT_MEAN/STD; open_clip OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_SEED = 20240601  # every process builds the same tiny weights from this seed


@dataclass(frozen=True)
class VaeSpec:
    """A VAE preset: a hub id, or a seeded random tiny architecture."""
    name: str
    hub_id: str | None
    tiny: bool = False
    analytic: bool = False  # weight-free (pipeline/pixel_vae.py): pictures a CPU demo can judge


VAES: dict[str, VaeSpec] = {
    "sd-vae-ft-ema": VaeSpec("sd-vae-ft-ema", "stabilityai/sd-vae-ft-ema"),
    "sd-vae-ft-mse": VaeSpec("sd-vae-ft-mse", "stabilityai/sd-vae-ft-mse"),
    "tiny-vae": VaeSpec("tiny-vae", None, tiny=True),
    "pixel-vae": VaeSpec("pixel-vae", None, analytic=True),
}
# Same library class and geometry as SD's VAE (4 downsampling levels -> factor 8, 4 latent channels), tiny widths.
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32),
                       layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=256,
                       scaling_factor=SD_VAE_SCALE)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'NAME' or 'NAME=PATH' -> (lower-case name, path or None); REPA spells e.g. 'clip-vit-L'."""
    name, eq, path = spec.strip().partition("=")
    return name.strip().lower(), (path.strip() or None) if eq else None


def _check_name(name: str, registry: dict, what: str, flag: str) -> None:
    if name not in registry:
        raise UserError(f"unknown {what} '{name}' ({flag}); choose one of: {', '.join(sorted(registry))}")


@dataclass(frozen=True)
class EncoderSpec:
    """A representation encoder: timm architecture, weights tag and preprocessing."""
    name: str
    family: str  # 'dinov2' | 'siglip' | 'mocov3' | 'mae' | 'jepa' | 'clip' | 'dinov1'
    arch: str  # timm architecture
    tag: str | None  # timm pretrained tag; None for tiny presets
    patch_size: int
    input_at_256: int  # input side at 256-px crops; scales with resolution
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tiny_kwargs: dict = field(default_factory=dict)
    native_size: int = 0  # the pretrained model's image size (for the tiny's seeded 'checkpoint')
    resize_first: bool = False  # CLIP: resize, then normalise; the others normalise first (REPA train.py)
    tokens: str = "final-norm patch tokens"  # the token rule, recorded in the manifest
    file_format: str = "timm checkpoint"  # what NAME=PATH expects

    @property
    def tiny(self) -> bool:
        return self.name.startswith("tiny-")

    @property
    def embed_dim(self) -> int | None:
        return self.tiny_kwargs.get("embed_dim")


DINOV2_TOKENS = "x_norm_patchtokens: final-norm patch tokens, without CLS and register tokens"


def _dino(name: str, arch: str) -> EncoderSpec:
    return EncoderSpec(name, "dinov2", arch, "lvd142m", 14, 224, IMAGENET_MEAN, IMAGENET_STD, native_size=518,
                       tokens=DINOV2_TOKENS)


from .presets_repa import REPA_ENCODERS  # noqa: E402 - needs EncoderSpec above

ENCODERS: dict[str, EncoderSpec] = {
    **{f"dinov2-vit-{s}": _dino(f"dinov2-vit-{s}", f"vit_{w}_patch14_dinov2")
       for s, w in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))},
    **{f"dinov2-vit-{s}-reg": _dino(f"dinov2-vit-{s}-reg", f"vit_{w}_patch14_reg4_dinov2")
       for s, w in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))},
    "siglip-vit-b": EncoderSpec("siglip-vit-b", "siglip", "vit_base_patch16_siglip_256", "webli", 16, 256,
                                SIGLIP_MEAN, SIGLIP_STD, native_size=256),
    "siglip-so400m": EncoderSpec("siglip-so400m", "siglip", "vit_so400m_patch14_siglip_224", "webli", 14, 224,
                                 SIGLIP_MEAN, SIGLIP_STD, native_size=224),
    "tiny-dinov2": EncoderSpec("tiny-dinov2", "dinov2", "vit_small_patch14_dinov2", None, 14, 224, IMAGENET_MEAN,
                               IMAGENET_STD, dict(embed_dim=64, depth=2, num_heads=2), native_size=518,
                               tokens=DINOV2_TOKENS),
    "tiny-siglip": EncoderSpec("tiny-siglip", "siglip", "vit_base_patch16_siglip_256", None, 16, 256, SIGLIP_MEAN,
                               SIGLIP_STD, dict(embed_dim=64, depth=2, num_heads=2), native_size=256),
}

ENCODERS.update(REPA_ENCODERS)


def input_size(spec: EncoderSpec, resolution: int) -> int:
    """Encoder input side: 224 at 256 px for DINOv2 (REPA), 448 at 512 px; a multiple of the patch."""
    size = spec.input_at_256 * resolution // 256
    if size % spec.patch_size:
        raise UserError(f"encoder {spec.name}: resolution {resolution} gives input {size}, "
                        f"not a multiple of patch {spec.patch_size}")
    return size


