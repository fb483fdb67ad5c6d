"""Loaders for the paper's other target encoders, straight from the files REPA tells users to download.

Each official layout is read as is (no conversion step), renamed to timm / open_clip keys in memory, and the
position table is resampled to the token grid with timm's `resample_abs_pos_embed` (bicubic, antialias), as
REPA's `utils.py load_encoders` does. The result exposes `forward_features`, `num_prefix_tokens` and
`embed_dim`, so `encoders.Encoder` selects the tokens the same way for every family.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any

import torch
from torch import nn

from common import UserError

from .presets import TINY_SEED, EncoderSpec

TIMM_FAMILIES = ("mocov3", "mae", "jepa", "dinov1")
FAMILIES = (*TIMM_FAMILIES, "clip")
# RCG's MoCo v3 ViT-L checkpoint misnames four keys of blocks 13 and 14 (REPA utils.py fix_mocov3_state_dict).
MOCOV3_TYPOS = (("blocks.13.norm13", "blocks.13.norm1"), ("blocks.13.mlp.fc13", "blocks.13.mlp.fc1"),
                ("blocks.14.norm14", "blocks.14.norm2"), ("blocks.14.mlp.fc14", "blocks.14.mlp.fc2"))


def read_checkpoint(path: str, flag: str) -> Any:
    """torch.load without arbitrary pickles (argparse.Namespace allowed, as training dicts carry one)."""
    if not os.path.exists(path):
        raise UserError(f"encoder weights not found: {path} ({flag})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a wrong or corrupt file: one line naming it
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read encoder weights {path} ({flag}): {msg}") from e


def _need(ckpt: Any, key: str, spec: EncoderSpec, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
        have = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path}: not the {spec.name} file layout {spec.file_format}; top-level keys: {have}")
    return ckpt[key]


def mocov3_state_dict(ckpt: Any, spec: EncoderSpec, path: str) -> dict[str, torch.Tensor]:
    """{'state_dict': {'module.base_encoder.*'}} -> the base encoder's timm keys (REPA fix_mocov3_state_dict)."""
    prefix, out = "module.base_encoder.", {}
    for k, v in _need(ckpt, "state_dict", spec, path).items():
        if not k.startswith(prefix):  # momentum encoder, predictor
            continue
        k = k[len(prefix):]
        for bad, good in MOCOV3_TYPOS:
            k = k.replace(bad, good)
        if "head" in k or k.split(".")[0] == "fc":  # the projection head
            continue
        out[k] = v
    return out


def official_state_dict(spec: EncoderSpec, ckpt: Any, path: str) -> dict[str, torch.Tensor]:
    """The encoder's weights in timm's key names, from the family's official checkpoint layout."""
    if spec.family == "mocov3":
        sd = mocov3_state_dict(ckpt, spec, path)
    elif spec.family == "mae":
        sd = dict(_need(ckpt, "model", spec, path))
    elif spec.family == "jepa":  # REPA reads 'encoder' (not 'target_encoder') and strips DDP's 'module.'
        sd = {k.removeprefix("module."): v for k, v in _need(ckpt, "encoder", spec, path).items()}
    else:  # dinov1: a plain state dict
        sd = {k: v for k, v in _need({"sd": ckpt}, "sd", spec, path).items() if not k.startswith("head.")}
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise UserError(f"{path}: no 'pos_embed' / 'patch_embed.proj.weight' after reading it as "
                        f"{spec.file_format}; is it the {spec.name} checkpoint?")
    return sd


def _check_dims(spec: EncoderSpec, width: int, depth: int, patch: int, path: str) -> None:
    want = (spec.tiny_kwargs["embed_dim"], spec.tiny_kwargs["depth"], spec.patch_size)
    if (width, depth, patch) != want:
        raise UserError(f"{path}: holds a ViT of width {width}, depth {depth}, patch {patch}; {spec.name} is "
                        f"{want[0]} x {want[1]}, patch {want[2]} (wrong file for --encoders {spec.name}=PATH?)")


def _resample(pos: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """(1, prefix + g*g, D) -> (1, prefix + grid*grid, D), bicubic with antialias (REPA's call)."""
    from timm.layers import resample_abs_pos_embed
    if pos.shape[1] == prefix + grid * grid:
        return pos
    return resample_abs_pos_embed(pos.float(), new_size=[grid, grid], num_prefix_tokens=prefix).to(pos.dtype)


def _timm_model(spec: EncoderSpec, size: int, pretrained_tag: str | None = None) -> nn.Module:
    import timm
    arch = f"{spec.arch}.{pretrained_tag}" if pretrained_tag else spec.arch
    return timm.create_model(arch, pretrained=pretrained_tag is not None, num_classes=0, img_size=size,
                             **spec.tiny_kwargs)


def _finish_timm(spec: EncoderSpec, model: nn.Module) -> nn.Module:
    if spec.family == "mae":
        model.norm = nn.Identity()  # REPA's MAE tokens are the last block's output, before the final norm
    return model


def load_timm_family(spec: EncoderSpec, sd: dict[str, torch.Tensor], size: int, path: str) -> nn.Module:
    """Official weights (timm key names) -> timm VisionTransformer at `size`, loaded strictly."""
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    _check_dims(spec, int(sd["pos_embed"].shape[-1]), depth, int(sd["patch_embed.proj.weight"].shape[-1]), path)
    model = _timm_model(spec, size)
    sd = dict(sd, pos_embed=_resample(sd["pos_embed"], size // spec.patch_size, model.num_prefix_tokens))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: keys differ from {spec.name} ({spec.arch}): missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return _finish_timm(spec, model)


class ClipTokens(nn.Module):
    """An open_clip visual tower whose forward_features is the transformer output before ln_post (CLS first)."""
    num_prefix_tokens = 1

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.embed_dim = int(visual.transformer.width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, 1 + T, D): conv1, CLS, position table, ln_pre, transformer (REPA clip_vit)."""
        return self.visual.transformer(self.visual._embeds(x))


def _clip_tower(spec: EncoderSpec, size: int, visual: nn.Module, where: str) -> ClipTokens:
    width, layers = int(visual.transformer.width), len(visual.transformer.resblocks)
    _check_dims(spec, width, layers, int(visual.conv1.weight.shape[-1]), where)
    grid = size // spec.patch_size
    with torch.no_grad():
        pos = _resample(visual.positional_embedding.data[None], grid, 1)[0]  # (1 + grid*grid, D)
        visual.positional_embedding = nn.Parameter(pos, requires_grad=False)
    visual.grid_size = (grid, grid)
    return ClipTokens(visual.float())


def openai_clip_model(path: str, flag: str) -> nn.Module:
    """An OpenAI CLIP file (TorchScript archive or plain state dict) -> open_clip's CLIP, in fp32, never unpickling.

    open_clip's own `load_openai_model` falls back to `torch.load` without `weights_only`, which runs arbitrary
    pickles on torch < 2.6; here a state dict goes through `read_checkpoint` (weights_only=True) instead.
    """
    from open_clip.model import build_model_from_openai_state_dict
    try:
        sd = torch.jit.load(path, map_location="cpu").state_dict()  # the released archives: tensors and code only
    except RuntimeError:  # not TorchScript: a plain state dict (or {'state_dict': {'module.*'}})
        sd = read_checkpoint(path, flag)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = {k.removeprefix("module."): v for k, v in sd["state_dict"].items()}
    return build_model_from_openai_state_dict(sd, cast_dtype=torch.float32).float().eval()


def load_clip(spec: EncoderSpec, size: int, path: str | None, flag: str) -> ClipTokens:
    """OpenAI CLIP's visual tower via open_clip: a TorchScript archive or plain state dict, the hub, or tiny."""
    import open_clip
    if path is not None:
        if not os.path.exists(path):
            raise UserError(f"encoder weights not found: {path} ({flag})")
        try:
            visual = openai_clip_model(path, flag).visual
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a wrong or corrupt file: one line naming it
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read {path} as {spec.file_format} ({flag}): {msg}") from e
        return _clip_tower(spec, size, visual, path)
    if spec.tiny:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
        d = spec.tiny_kwargs
        cfg = CLIPVisionCfg(layers=d["depth"], width=d["embed_dim"], patch_size=spec.patch_size,
                            image_size=spec.native_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            visual = _build_vision_tower(d["embed_dim"], cfg, quick_gelu=True)  # OpenAI CLIP uses QuickGELU
        return _clip_tower(spec, size, visual, spec.name)
    try:
        visual = open_clip.create_model(spec.arch, pretrained=spec.tag).visual
    except Exception as e:  # noqa: BLE001 - hub/IO errors: one line naming the source
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {spec.name} from open_clip '{spec.arch}' pretrained='{spec.tag}' "
                        f"(or pass {spec.name}=PATH to {spec.file_format}): {msg}") from e
    return _clip_tower(spec, size, visual, f"open_clip {spec.arch}/{spec.tag}")


def tiny_official_state_dict(spec: EncoderSpec) -> dict[str, torch.Tensor]:
    """A tiny preset's seeded random weights, in timm key names at the model's native size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return _timm_model(spec, spec.native_size).state_dict()


def build(spec: EncoderSpec, size: int, path: str | None, flag: str) -> tuple[nn.Module, str]:
    """(model, weights description) for a REPA-family encoder at input side `size`."""
    if spec.family == "clip":
        model = load_clip(spec, size, path, flag)
        where = path or (f"random-init(seed={TINY_SEED})" if spec.tiny else f"open_clip/{spec.arch}.{spec.tag}")
        return model, where
    if path is not None:
        sd = official_state_dict(spec, read_checkpoint(path, flag), path)
        return load_timm_family(spec, sd, size, path), path
    if spec.tiny:
        sd = tiny_official_state_dict(spec)
        return load_timm_family(spec, sd, size, spec.name), f"random-init(seed={TINY_SEED})"
    if spec.tag is None:
        raise UserError(f"{spec.name} has no hub copy: download the checkpoint REPA names and pass "
                        f"--encoders {spec.name}=PATH ({spec.file_format})")
    try:  # timm's pretrained filter resamples the position table with the same call
        model = _timm_model(spec, size, spec.tag)
    except Exception as e:  # noqa: BLE001 - hub/IO errors: one line naming the source
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {spec.name} from timm/{spec.arch}.{spec.tag} (or pass {spec.name}=PATH "
                        f"to {spec.file_format}): {msg}") from e
    return _finish_timm(spec, model), f"timm/{spec.arch}.{spec.tag}"
