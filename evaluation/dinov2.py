"""DINOv2 features for FD_DINOv2, as EDM2's `DINOv2Detector` computes them (after layer6ai-labs/dgm-eval).

uint8 images -> bicubic resize to 224 (torch: antialiased, on float pixels; pil: PIL's bicubic on uint8, which
is dgm-eval exactly) -> /255 -> ImageNet mean/std -> DINOv2 ViT -> the final-norm CLS token (1024-d for ViT-L).
The weights load like the pipeline's encoders (`NAME[=PATH]`, timm names, the seeded `tiny-dinov2` for tests).
The official hub model interpolates its 37x37 position embedding to the 16x16 grid at every call (bicubic,
no antialias, scale factor (16 + 0.1)/37); timm resamples differently, so we compute the official one once.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError
from manifests.io import sha256_file

DEFAULT_DINOV2 = "dinov2-vit-l"  # EDM2: torch.hub 'dinov2_vitl14'
INPUT_SIZE = 224  # EDM2 DINOv2Detector / dgm-eval resize target
RESIZE_MODES = ("torch", "pil")  # EDM2's resize_mode: 'torch' is its default, 'pil' matches dgm-eval exactly
POS_EMBED_OFFSET = 0.1  # DINOv2 interpolate_pos_encoding: `w0 + 0.1` (facebookresearch/dino issue 8)


@dataclass(frozen=True)
class DinoSpec:
    """A resolved `--dinov2 NAME[=PATH]`."""
    name: str
    path: str | None
    arch: str
    tag: str | None
    tiny: bool
    native_size: int
    tiny_kwargs: dict

    @property
    def hub_id(self) -> str:
        return f"timm/{self.arch}.{self.tag}"


def parse_dinov2(text: str) -> DinoSpec:
    """'dinov2-vit-l' or 'dinov2-vit-l=/path/model.safetensors' -> a DinoSpec (names of pipeline.encoders)."""
    from pipeline.encoders import ENCODERS, parse_spec
    name, path = parse_spec(text)
    choices = sorted(n for n, s in ENCODERS.items() if s.family == "dinov2" and "-reg" not in n)
    spec = ENCODERS.get(name)
    if spec is None or spec.family != "dinov2" or "-reg" in name:
        why = " (register variants are not the FD_DINOv2 network)" if "-reg" in name else ""
        raise UserError(f"--dinov2 {text}: unknown DINOv2 model '{name}'{why}; choose one of: {', '.join(choices)}")
    return DinoSpec(name, path, spec.arch, spec.tag, spec.tiny, spec.native_size, dict(spec.tiny_kwargs))


def weights_available(spec: DinoSpec) -> tuple[bool, str]:
    """Whether loading needs no download, and if not, why (the one line the job prints)."""
    if spec.path is not None:
        return os.path.isfile(spec.path), f"{spec.path} not found"
    if spec.tiny:
        return True, ""
    from huggingface_hub import try_to_load_from_cache
    for fname in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(spec.hub_id, fname, cache_dir=os.environ.get("HF_HUB_CACHE"))  # read now
        if isinstance(hit, str) and os.path.isfile(hit):
            return True, ""
    return False, f"{spec.hub_id} is not in the Hugging Face cache"


def official_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D), as DINOv2's `interpolate_pos_encoding` (hub defaults)."""
    n = pos_embed.shape[1] - 1
    m = int(math.isqrt(n))
    if m * m != n:
        raise ValueError(f"position embedding of {n} patch tokens is not a square grid")
    pe = pos_embed.float()
    cls, patch = pe[:, :1], pe[:, 1:]
    scale = (grid + POS_EMBED_OFFSET) / m
    patch = F.interpolate(patch.reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                          mode="bicubic", antialias=False)  # (1, D, grid, grid)
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"interpolated grid is {tuple(patch.shape[-2:])}, expected {grid}x{grid}")
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1).to(pos_embed.dtype)


def build_vit(spec: DinoSpec) -> tuple[torch.nn.Module, str]:
    """The timm ViT at its native size with its weights (file, seeded tiny, or the hub), and their description."""
    import timm
    from pipeline.encoders import ENCODERS, tiny_state_dict
    if spec.path is not None:
        if not os.path.isfile(spec.path):
            raise UserError(f"DINOv2 weights not found: {spec.path} (--dinov2 {spec.name}={spec.path})")
        overlay, weights = dict(file=spec.path), spec.path
    elif spec.tiny:
        overlay, weights = dict(state_dict=tiny_state_dict(ENCODERS[spec.name])), "random-init (tiny preset)"
    else:
        overlay, weights = None, spec.hub_id
    try:
        model = timm.create_model(f"{spec.arch}.{spec.tag}" if spec.tag else spec.arch, pretrained=True,
                                  pretrained_cfg_overlay=overlay, num_classes=0, img_size=spec.native_size,
                                  **spec.tiny_kwargs)
    except Exception as e:  # noqa: BLE001 - hub/IO errors of many kinds: one line naming the source
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (HF_HUB_OFFLINE is set: is it in the cache?)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"cannot load DINOv2 {spec.name} from '{weights}'{offline}: {msg}") from e
    return model, weights


def pil_resize(images: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """dgm-eval's resize: PIL bicubic on each uint8 image; (N, H, W, 3) -> (N, size, size, 3) uint8."""
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(im, "RGB").resize((size, size), Image.Resampling.BICUBIC))
                     for im in images])


class DinoV2Features:
    """uint8 NHWC images -> final-norm CLS features (N, D), fp32 with TF32 off."""

    def __init__(self, spec: str | DinoSpec = DEFAULT_DINOV2, device: str | torch.device = "cpu",
                 resize: str = "torch") -> None:
        if resize not in RESIZE_MODES:
            raise UserError(f"--resize {resize}: choose one of {', '.join(RESIZE_MODES)}")
        self.spec = parse_dinov2(spec) if isinstance(spec, str) else spec
        self.resize = resize
        model, self.weights_id = build_vit(self.spec)
        patch = model.patch_embed.patch_size[0]
        pos = official_pos_embed(model.pos_embed.detach(), INPUT_SIZE // patch)  # before timm resamples its own
        model.set_input_size(img_size=(INPUT_SIZE, INPUT_SIZE))
        with torch.no_grad():
            model.pos_embed.copy_(pos)
        self.weights_sha256 = sha256_file(self.spec.path) if self.spec.path else None
        self.comparable = not self.spec.tiny
        self.dim = int(model.embed_dim)
        self.device = torch.device(device)
        self.net = model.to(self.device).eval().requires_grad_(False)
        self.mean = torch.tensor((0.485, 0.456, 0.406), device=self.device).view(1, 3, 1, 1)  # ImageNet (EDM2)
        self.std = torch.tensor((0.229, 0.224, 0.225), device=self.device).view(1, 3, 1, 1)

    @property
    def cache_id(self) -> str:
        """What identifies this network and its input pipeline in cache keys and reference files."""
        return f"dinov2:{self.spec.name}:{self.weights_sha256 or self.weights_id}:resize={self.resize}"

    def preprocess(self, images) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float32 (N, 3, 224, 224) on the device."""
        if self.resize == "pil":
            arr = pil_resize(np.asarray(torch.as_tensor(images).cpu()))
            x = torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float()  # (N, 3, 224, 224) 0..255
        else:
            x = torch.as_tensor(images).to(self.device).permute(0, 3, 1, 2).float()  # (N, 3, H, W) 0..255
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        return (x / 255 - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {x.dtype} {tuple(x.shape)}")
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.autocast(self.device.type, enabled=False):
                tokens = self.net.forward_features(self.preprocess(x))  # (N, 1 + T, D), after the final norm
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        return tokens[:, 0].float()  # (N, D): x_norm_clstoken, the hub model's output
