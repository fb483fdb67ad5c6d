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

# --- The paper's other target encoders (Table 2; REPA README `--enc-type`), loaded from the files REPA points to.
# Preprocessing and token rules follow REPA's train.py `preprocess_raw_image` and the token selection after
# `forward_features`; the loaders live in pipeline/vit_loaders.py.
MOCOV3_TOKENS = "final-norm patch tokens, CLS dropped (forward_features(x)[:, 1:])"
MAE_TOKENS = "last block output, CLS dropped, WITHOUT the final LayerNorm (REPA mae_vit forward_features)"
JEPA_TOKENS = "final-norm tokens (I-JEPA has no CLS token)"
CLIP_TOKENS = "visual transformer output, CLS dropped, before ln_post and proj (REPA UpdatedVisionTransformer)"
DINOV1_TOKENS = "final-norm patch tokens, CLS dropped (forward_features(x)[:, 1:])"

MOCOV3_FILE = "{'state_dict': {'module.base_encoder.*'}} (RCG mocov3_vit{b,l}.pth; head/predictor keys dropped)"
MAE_FILE = "{'model': {...}} (MAE mae_pretrain_vit_large.pth)"
JEPA_FILE = "{'encoder': {'module.*'}} (I-JEPA IN1K-vit.h.14-300e.pth.tar)"
CLIP_FILE = "OpenAI TorchScript archive ViT-L-14.pt, or its plain state dict"
DINOV1_FILE = "plain state dict (DINO dino_vitbase16_pretrain.pth)"
TIMM_FILE = "timm checkpoint (.safetensors / .pth / .bin)"


def _vit(name: str, family: str, arch: str, tag: str | None, dims: tuple[int, int, int], *, patch: int = 16,
         at_256: int = 256, mean=IMAGENET_MEAN, std=IMAGENET_STD, tokens: str, fmt: str,
         resize_first: bool = False) -> EncoderSpec:
    d, depth, heads = dims
    return EncoderSpec(name, family, arch, tag, patch, at_256, mean, std,
                       dict(embed_dim=d, depth=depth, num_heads=heads), native_size=224, resize_first=resize_first,
                       tokens=tokens, file_format=fmt)


TINY = (64, 2, 2)  # tiny widths: every family's tiny preset is the real class and file layout at this size

REPA_ENCODERS: dict[str, EncoderSpec] = {
    # MoCo v3 (RCG's checkpoints; no hub copy): x/255, ImageNet normalise, no resize: 256 px / patch 16 -> 16x16.
    "mocov3-vit-b": _vit("mocov3-vit-b", "mocov3", "vit_base_patch16_224", None, (768, 12, 12),
                         tokens=MOCOV3_TOKENS, fmt=MOCOV3_FILE),
    "mocov3-vit-l": _vit("mocov3-vit-l", "mocov3", "vit_large_patch16_224", None, (1024, 24, 16),
                         tokens=MOCOV3_TOKENS, fmt=MOCOV3_FILE),
    # MAE ViT-L/16: as MoCo v3, but the tokens skip the final norm.
    "mae-vit-l": _vit("mae-vit-l", "mae", "vit_large_patch16_224", "mae", (1024, 24, 16), tokens=MAE_TOKENS,
                      fmt=MAE_FILE),
    # I-JEPA ViT-H/14 at 224: x/255, ImageNet normalise, bicubic to 224 (16x16 tokens of patch 14).
    "jepa-vit-h": _vit("jepa-vit-h", "jepa", "vit_huge_patch14_gap_224", "in1k_ijepa", (1280, 32, 16), patch=14,
                       at_256=224, tokens=JEPA_TOKENS, fmt=JEPA_FILE),
    # OpenAI CLIP ViT-L/14 visual tower (open_clip): x/255, bicubic to 224, then CLIP normalise.
    "clip-vit-l": _vit("clip-vit-l", "clip", "ViT-L-14", "openai", (1024, 24, 16), patch=14, at_256=224,
                       mean=CLIP_MEAN, std=CLIP_STD, tokens=CLIP_TOKENS, fmt=CLIP_FILE, resize_first=True),
    # DINO ViT-B/16: REPA's dinov1 branch imports a module it does not ship; this is its obvious equivalent
    # (the MoCo v3 rule: ImageNet normalise, no resize, final-norm patch tokens without CLS).
    "dinov1-vit-b": _vit("dinov1-vit-b", "dinov1", "vit_base_patch16_224", "dino", (768, 12, 12),
                         tokens=DINOV1_TOKENS, fmt=DINOV1_FILE),
    # SigLIP ViT-L/16 at 256 px (paper Table 2's SigLIP-L): the SigLIP-B rule, 16x16 tokens.
    "siglip-vit-l": EncoderSpec("siglip-vit-l", "siglip", "vit_large_patch16_siglip_256", "webli", 16, 256,
                                SIGLIP_MEAN, SIGLIP_STD, native_size=256),
    # Tiny presets: same classes, key names and file layouts, random widths. tiny-mocov3 has 15 blocks so a
    # file can carry the ViT-L checkpoint's blocks.13/14 key typo.
    "tiny-mocov3": _vit("tiny-mocov3", "mocov3", "vit_base_patch16_224", None, (32, 15, 2), tokens=MOCOV3_TOKENS,
                        fmt=MOCOV3_FILE),
    "tiny-mae": _vit("tiny-mae", "mae", "vit_large_patch16_224", None, TINY, tokens=MAE_TOKENS, fmt=MAE_FILE),
    "tiny-jepa": _vit("tiny-jepa", "jepa", "vit_huge_patch14_gap_224", None, TINY, patch=14, at_256=224,
                      tokens=JEPA_TOKENS, fmt=JEPA_FILE),
    "tiny-clip": _vit("tiny-clip", "clip", "ViT-L-14", None, (64, 2, 1), patch=14, at_256=224, mean=CLIP_MEAN,
                      std=CLIP_STD, tokens=CLIP_TOKENS, fmt=CLIP_FILE, resize_first=True),
    "tiny-dinov1": _vit("tiny-dinov1", "dinov1", "vit_base_patch16_224", None, TINY, tokens=DINOV1_TOKENS,
                        fmt=DINOV1_FILE),
}

ENCODERS.update(REPA_ENCODERS)


@dataclass(frozen=True)
class TextEncoderSpec:
    """A caption encoder (transformers CLIPTokenizer + CLIPTextModel), as U-ViT's FrozenCLIPEmbedder builds it."""
    name: str
    hub_id: str | None  # None: seeded random weights and a generated tokenizer (no download)
    tiny_config: dict = field(default_factory=dict)  # CLIPTextConfig widths of a tiny preset

    @property
    def tiny(self) -> bool:
        return self.hub_id is None


# U-ViT libs/clip.py FrozenCLIPEmbedder: max_length=77 (CLIP's context length), padding="max_length", truncation.
TEXT_LENGTH = 77
TEXT_ENCODERS: dict[str, TextEncoderSpec] = {
    # CLIP ViT-L/14's text transformer: last_hidden_state (77, 768), U-ViT's and REPA's MS-COCO contexts.
    "clip-vit-l-text": TextEncoderSpec("clip-vit-l-text", "openai/clip-vit-large-patch14"),
    # Same classes and code path at width 64, for tests and the CPU demo.
    "tiny-clip-text": TextEncoderSpec("tiny-clip-text", None, dict(hidden_size=64, intermediate_size=128,
                                                                   num_hidden_layers=2, num_attention_heads=2)),
}


def input_size(spec: EncoderSpec, resolution: int) -> int:
    """Encoder input side: 224 at 256 px for DINOv2 (REPA), 448 at 512 px; a multiple of the patch."""
    size = spec.input_at_256 * resolution // 256
    if size % spec.patch_size:
        raise UserError(f"encoder {spec.name}: resolution {resolution} gives input {size}, "
                        f"not a multiple of patch {spec.patch_size}")
    return size
