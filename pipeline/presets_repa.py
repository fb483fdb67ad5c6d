"""The paper's other target encoders (Table 2; REPA README `--enc-type`), loaded from the files REPA points to.

Preprocessing and token rules follow REPA's train.py `preprocess_raw_image` and the token selection after
`forward_features`; the loaders live in pipeline/vit_loaders.py.
"""
from __future__ import annotations

from .presets import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, EncoderSpec

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
