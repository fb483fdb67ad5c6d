"""The paper's Table 2 encoders: each family's official file layout -> tokens equal to REPA's online computation.

Every test builds the real architecture class with random weights (tiny widths), writes the file layout that
REPA tells users to download, loads it through `NAME=PATH`, and compares the tokens with an independent
computation written out here: REPA's `preprocess_raw_image` and a plain ViT forward over the raw tensors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import UserError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _crops(res: int, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(res)
    return torch.randint(0, 256, (n, res, res, 3), dtype=torch.uint8, generator=g)  # (N, R, R, 3)


def _preprocess(crops: torch.Tensor, stats, size: int | None, resize_first: bool = False) -> torch.Tensor:
    """REPA train.py preprocess_raw_image, written out: x/255, normalise and bicubic resize in its order."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    x = crops.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, R, R)
    if resize_first:
        x = F.interpolate(x, size, mode="bicubic")
    x = (x - mean) / std
    if size is not None and not resize_first:
        x = F.interpolate(x, size, mode="bicubic")
    return x


def _vit_reference(sd: dict, x: torch.Tensor, heads: int, prefix: int, final_norm: bool) -> torch.Tensor:
    """A pre-norm ViT over the raw timm-named tensors: patch conv, tokens, blocks, optional final norm."""
    from timm.layers import resample_abs_pos_embed
    w = sd["patch_embed.proj.weight"]
    p, d = w.shape[-1], w.shape[0]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)  # (N, T, D)
    if prefix:
        t = torch.cat([sd["cls_token"].expand(len(t), -1, -1), t], 1)  # (N, 1 + T, D)
    grid = x.shape[-1] // p
    t = t + resample_abs_pos_embed(sd["pos_embed"], [grid, grid], num_prefix_tokens=prefix)

    def ln(v, k):
        return F.layer_norm(v, (d,), sd[f"{k}.weight"], sd[f"{k}.bias"], eps=1e-6)

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}"
        qkv = F.linear(ln(t, f"{b}.norm1"), sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"])
        q, k, v = qkv.view(*t.shape[:2], 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # 3 x (N, H, L, Dh)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(t.shape)  # (N, L, D)
        t = t + F.linear(a, sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])
        h = F.gelu(F.linear(ln(t, f"{b}.norm2"), sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"]))
        t = t + F.linear(h, sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"])
    if final_norm:
        t = ln(t, "norm")
    return t[:, prefix:]  # (N, T, D)


def _random_timm(arch: str, dims: tuple[int, int, int], seed: int) -> dict[str, torch.Tensor]:
    """The family's timm class at 224 px with random weights, every tensor perturbed (LayerNorms included)."""
    import timm
    torch.manual_seed(seed)
    d, depth, heads = dims
    m = timm.create_model(arch, pretrained=False, num_classes=0, img_size=224, embed_dim=d, depth=depth,
                          num_heads=heads)
    return {k: v + 0.1 * torch.randn_like(v) for k, v in m.state_dict().items()}


def _tokens(spec: str, res: int, crops: torch.Tensor) -> torch.Tensor:
    from pipeline.encoders import load_encoder
    return load_encoder(spec, res)(crops)


@pytest.mark.parametrize("res", [256, 512])
def test_mocov3_rcg_layout_with_vit_l_key_typo(tmp_path, res):
    """{'state_dict': {'module.base_encoder.*'}}, norm13/fc13/norm14/fc14 typo, head+predictor+momentum dropped."""
    sd = _random_timm("vit_base_patch16_224", (32, 15, 2), seed=1)
    typo = {"blocks.13.norm1.": "blocks.13.norm13.", "blocks.13.mlp.fc1.": "blocks.13.mlp.fc13.",
            "blocks.14.norm2.": "blocks.14.norm14.", "blocks.14.mlp.fc2.": "blocks.14.mlp.fc14."}
    official = {}
    for k, v in sd.items():
        for good, bad in typo.items():
            k = k.replace(good, bad)
        official[f"module.base_encoder.{k}"] = v
    assert "module.base_encoder.blocks.13.norm13.weight" in official
    official.update({"module.base_encoder.head.0.weight": torch.randn(16, 32),
                     "module.base_encoder.head.1.running_mean": torch.randn(16),
                     "module.momentum_encoder.cls_token": torch.randn(1, 1, 32),
                     "module.predictor.0.weight": torch.randn(16, 16)})
    path = tmp_path / "mocov3_vitl.pth"
    torch.save({"epoch": 300, "arch": "vit_large", "state_dict": official}, path)
    crops = _crops(res)
    got = _tokens(f"tiny-mocov3={path}", res, crops)
    want = _vit_reference(sd, _preprocess(crops, IMAGENET, None), heads=2, prefix=1, final_norm=True)
    assert got.shape == (2, (res // 16) ** 2, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mae_tokens_skip_the_final_norm(tmp_path):
    sd = _random_timm("vit_large_patch16_224", (64, 2, 2), seed=2)
    path = tmp_path / "mae_pretrain_vit_large.pth"
    torch.save({"model": sd}, path)
    crops = _crops(256)
    got = _tokens(f"tiny-mae={path}", 256, crops)
    x = _preprocess(crops, IMAGENET, None)
    torch.testing.assert_close(got, _vit_reference(sd, x, heads=2, prefix=1, final_norm=False), rtol=1e-4, atol=1e-4)
    normed = _vit_reference(sd, x, heads=2, prefix=1, final_norm=True)
    assert (got - normed).abs().max() > 0.1  # the token rule is visible in the numbers


def test_ijepa_encoder_not_target_encoder(tmp_path):
    """{'encoder': {'module.*'}}; REPA reads 'encoder', not 'target_encoder'; no CLS; resize to 224."""
    sd = _random_timm("vit_huge_patch14_gap_224", (64, 2, 2), seed=3)
    other = _random_timm("vit_huge_patch14_gap_224", (64, 2, 2), seed=4)
    assert "cls_token" not in sd and sd["pos_embed"].shape == (1, 256, 64)
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save({"encoder": {f"module.{k}": v for k, v in sd.items()},
                "target_encoder": {f"module.{k}": v for k, v in other.items()},
                "predictor": {"module.mask_token": torch.zeros(1, 1, 32)}, "epoch": 300}, path)
    crops = _crops(256)
    got = _tokens(f"tiny-jepa={path}", 256, crops)
    want = _vit_reference(sd, _preprocess(crops, IMAGENET, 224), heads=2, prefix=0, final_norm=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dinov1_plain_state_dict(tmp_path):
    sd = _random_timm("vit_base_patch16_224", (64, 2, 2), seed=5)
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(sd, path)
    crops = _crops(256)
    got = _tokens(f"tiny-dinov1={path}", 256, crops)
    want = _vit_reference(sd, _preprocess(crops, IMAGENET, None), heads=2, prefix=1, final_norm=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _tiny_openai_clip(seed: int):
    """An OpenAI-layout CLIP (open_clip's class, QuickGELU), weights rounded to fp16 as OpenAI ships them."""
    from open_clip.model import CLIP as OpenClip, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    m = OpenClip(32, CLIPVisionCfg(layers=2, width=64, patch_size=14, image_size=224),
                 CLIPTextCfg(context_length=8, vocab_size=50, width=64, heads=1, layers=1), quick_gelu=True).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((p + 0.05 * torch.randn_like(p)).half().float())
    return m


@pytest.mark.parametrize("layout,res", [("state_dict", 256), ("torchscript", 256), ("state_dict", 512)])
def test_openai_clip_tokens_before_ln_post(tmp_path, layout, res):
    m = _tiny_openai_clip(seed=6)
    path = tmp_path / "ViT-L-14.pt"
    if layout == "torchscript":  # OpenAI's download is a TorchScript archive of the whole CLIP
        mask = m.attn_mask  # OpenAI's causal mask is a plain attribute (a trace constant), not a buffer
        del m.attn_mask
        m.attn_mask = mask
        traced = torch.jit.trace(m, (torch.zeros(1, 3, 224, 224), torch.zeros(1, 8, dtype=torch.long)),
                                 strict=False, check_trace=False)
        traced.save(str(path))
    else:
        torch.save(m.state_dict(), path)
    crops = _crops(res)
    got = _tokens(f"tiny-clip={path}", res, crops)
    # The architecture's own pieces, in REPA's UpdatedVisionTransformer order; position table resampled to the grid.
    from timm.layers import resample_abs_pos_embed
    v, size = m.visual, 224 * res // 256
    x = _preprocess(crops, CLIP, size, resize_first=True)
    with torch.no_grad():
        t = v.conv1(x).flatten(2).transpose(1, 2)  # (N, T, D)
        t = torch.cat([v.class_embedding.expand(len(t), 1, -1), t], 1)
        g = size // 14
        t = t + resample_abs_pos_embed(v.positional_embedding[None], [g, g], num_prefix_tokens=1)
        t = v.transformer(v.ln_pre(t))
        want = t[:, 1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - v.ln_post(want)).abs().max() > 0.1  # ln_post is not applied


def test_wrong_files_are_one_line_errors(tmp_path):
    from pipeline.encoders import load_encoder
    sd = _random_timm("vit_base_patch16_224", (64, 2, 2), seed=7)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    with pytest.raises(UserError, match="file layout"):
        load_encoder(f"tiny-mocov3={tmp_path / 'mae.pth'}")  # MAE layout given as MoCo v3
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}}, tmp_path / "m3.pth")
    with pytest.raises(UserError, match="width 64, depth 2"):
        load_encoder(f"mocov3-vit-b={tmp_path / 'm3.pth'}")  # right layout, but not a ViT-B
    with pytest.raises(UserError, match="no hub copy"):
        load_encoder("mocov3-vit-l")
    with pytest.raises(UserError, match="not found"):
        load_encoder(f"mae-vit-l={tmp_path / 'missing.pth'}")
    # By name: the hub copy (offline here, so a one-line error that names it and the NAME=PATH way).
    with pytest.raises(UserError, match=r"timm/vit_base_patch16_224\.dino .*dinov1-vit-b=PATH"):
        load_encoder("DINOv1-ViT-B")


def test_registry_names_case_insensitive_and_manifest_record():
    from pipeline.encoders import load_encoder
    from pipeline.presets import ENCODERS, parse_spec
    for name in ("mocov3-vit-b", "mocov3-vit-l", "mae-vit-l", "jepa-vit-h", "clip-vit-l", "dinov1-vit-b",
                 "siglip-vit-l"):
        assert name in ENCODERS
    assert parse_spec("clip-vit-L=/x/ViT-L-14.pt") == ("clip-vit-l", "/x/ViT-L-14.pt")
    enc = load_encoder("TINY-CLIP", 256)
    meta = enc.meta
    assert meta["name"] == "tiny-clip" and meta["input_size"] == 224 and meta["grid"] == [16, 16]
    assert meta["mean"] == list(CLIP[0]) and "before ln_post" in meta["tokens"] and "then normalise" in meta["resize"]
    assert meta["pretrained"] is False and meta["weights"].startswith("random-init")
    out = enc(_crops(256)).numpy()
    assert out.shape == (2, 256, 64) and np.isfinite(out).all()
