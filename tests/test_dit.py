"""DiT: the facebookresearch/DiT state-dict layout, a forward written out from DiT's definition, the registry."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.models.dit import DiT_models
from trainer.models.sit import param_count


def dit_layout(depth: int, d: int, patch: int, c: int, n_cls: int, tokens: int, learn_sigma: bool = True,
               z_dims: tuple[int, ...] = (), proj: int = 2048, mlp_ratio: float = 4.0) -> dict[str, tuple[int, ...]]:
    """DiT models.py's key/shape list in its order, written out from the DiT definition; REPA projectors extra."""
    h, out_c = int(d * mlp_ratio), 2 * c if learn_sigma else c
    out = {"pos_embed": (1, tokens, d), "x_embedder.proj.weight": (d, c, patch, patch), "x_embedder.proj.bias": (d,),
           "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d),
           "t_embedder.mlp.2.bias": (d,), "y_embedder.embedding_table.weight": (n_cls + 1, d)}
    for i in range(depth):
        for name, shape in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (h, d), "mlp.fc2": (d, h),
                            "adaLN_modulation.1": (6 * d, d)}.items():
            out[f"blocks.{i}.{name}.weight"], out[f"blocks.{i}.{name}.bias"] = shape, shape[:1]
    for k, z in enumerate(z_dims):
        for j, shape in {0: (proj, d), 2: (proj, proj), 4: (z, proj)}.items():
            out[f"projectors.{k}.{j}.weight"], out[f"projectors.{k}.{j}.bias"] = shape, shape[:1]
    out["final_layer.linear.weight"] = (patch * patch * out_c, d)
    out["final_layer.linear.bias"] = (patch * patch * out_c,)
    out["final_layer.adaLN_modulation.1.weight"] = (2 * d, d)
    out["final_layer.adaLN_modulation.1.bias"] = (2 * d,)
    return out


def dit_xl2_params() -> int:
    """DiT-XL/2 at 256 px (32x32 latents, 1000 classes + null, learn_sigma) counted by hand: the paper's 675M."""
    d, depth, tokens, p, c_in, c_out = 1152, 28, 256, 2, 4, 8
    embed = tokens * d + (d * c_in * p * p + d) + (256 * d + d + d * d + d) + 1001 * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    final = (p * p * c_out * d + p * p * c_out) + (2 * d * d + 2 * d)
    return embed + depth * block + final


def test_dit_xl2_is_the_official_layout_and_675m_parameters():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)  # as DiT's sample.py builds it
    sd = m.state_dict()
    want = dit_layout(28, 1152, 2, 4, 1000, 256)
    assert list(sd) == list(want)  # the key order too: a released checkpoint reads back in its own order
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert dit_xl2_params() == 675_129_632 and param_count(m) == 675_129_632
    assert not m.pos_embed.requires_grad and not m.projectors


@pytest.mark.parametrize("name,depth,d,patch,learn_sigma", [
    ("DiT-S/2", 12, 384, 2, True), ("DiT-B/4", 12, 768, 4, False), ("DiT-L/8", 24, 1024, 8, True)])
def test_sizes_learn_sigma_and_projectors_as_extra_keys(name, depth, d, patch, learn_sigma):
    with torch.device("meta"):
        m = DiT_models[name](num_classes=10, learn_sigma=learn_sigma, encoder_depth=4, z_dims=[768, 1024])
    want = dit_layout(depth, d, patch, 4, 10, (32 // patch) ** 2, learn_sigma, (768, 1024))
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
    assert m.out_channels == (8 if learn_sigma else 4)


def test_registry_names_and_resolve():
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} | {"DiT-Debug/2"}
    full = DiT_models["DiT-Debug/2"].resolve(input_size=8, z_dims=[32])
    assert (full["depth"], full["hidden_size"], full["num_heads"], full["patch_size"], full["encoder_depth"],
            full["projector_dim"], full["learn_sigma"]) == (4, 64, 4, 2, 2, 256, True)  # = SiT-Debug/2's size
    with pytest.raises(ValueError, match="conflicts with the registry entry"):
        DiT_models["DiT-XL/2"].resolve(hidden_size=64)
    with pytest.raises(ValueError, match="must be in"):
        DiT_models["DiT-Debug/2"].resolve(encoder_depth=5, z_dims=[8])
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        DiT_models["DiT-B/8"].resolve(input_size=12)
    with pytest.raises(ValueError, match="unknown DiT argument"):
        DiT_models["DiT-B/2"].resolve(path_type="linear")  # a SiT-only argument


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, patch: int,
                      heads: int, depth: int) -> torch.Tensor:
    """DiT models.py's forward, written out on a state dict: patchify, sinusoid(t) MLP + label, adaLN-Zero blocks,
    final adaLN layer, unpatchify (nhwpqc -> nchpwq)."""
    def lin(z, key):
        return F.linear(z, sd[key + ".weight"], sd[key + ".bias"])

    n, _, hh, ww = x.shape
    d = sd["pos_embed"].shape[-1]
    ln = lambda z: F.layer_norm(z, (d,), eps=1e-6)  # noqa: E731
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (N, T, D)
    tokens = tok.shape[1]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]  # integer timesteps, unscaled
    temb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]  # (N, D)
    for i in range(depth):
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        h = ln(tok) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = lin(h, b + "attn.qkv").reshape(n, tokens, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), -1) @ v  # (N, H, T, d)
        tok = tok + g1[:, None] * lin(att.transpose(1, 2).reshape(n, tokens, d), b + "attn.proj")
        h = ln(tok) * (1 + sc2[:, None]) + sh2[:, None]
        tok = tok + g2[:, None] * lin(F.gelu(lin(h, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(ln(tok) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")  # (N, T, p*p*C_out)
    c_out, g = out.shape[-1] // patch ** 2, hh // patch
    return out.reshape(n, g, g, patch, patch, c_out).permute(0, 5, 1, 3, 2, 4).reshape(n, c_out, hh, ww)


def _released_layout_weights(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the released layout (the adaLN-Zero layers non-zero, so every path matters)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(shape, generator=g) for k, shape in layout.items()}


def test_released_layout_loads_strictly_and_forward_matches_dit_definition():
    sd = _released_layout_weights(dit_layout(4, 64, 2, 4, 10, 16))  # DiT-Debug/2 at 8x8 latents, no projectors
    m = DiT_models["DiT-Debug/2"](input_size=8, num_classes=10)
    m.load_state_dict(sd, strict=True)
    m.eval()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0, 417, 999]), torch.tensor([3, 10, 7])  # int64 timesteps; 10 = the null class
    out, zs = m(x, t, y)
    want = reference_forward(sd, x, t, y, patch=2, heads=4, depth=4)
    assert out.shape == (3, 8, 8, 8) and zs == []
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    # Integer and float timesteps are the same input (the embedder must not cast its frequencies to int64).
    torch.testing.assert_close(m(x, t.float(), y)[0], out)
    # A DiT-scale t matters: 417 and 418 give different outputs (a t in [0, 1] convention would blur them).
    assert not torch.allclose(m(x, t + 1, y)[0], out)


def test_projector_reads_the_hidden_state_after_encoder_depth():
    torch.manual_seed(0)
    m = DiT_models["DiT-Debug/2"](input_size=8, num_classes=10, z_dims=[32], encoder_depth=3).eval()
    seen = {}
    m.blocks[2].register_forward_hook(lambda mod, inp, out: seen.setdefault("h", out))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 2])
    out, zs = m(x, t, y)
    assert len(zs) == 1 and zs[0].shape == (2, 16, 32)
    torch.testing.assert_close(zs[0], m.projectors[0](seen["h"]))
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero init and a zero final layer, as DiT
    assert m.x_embedder.proj.bias.abs().sum() > 0  # DiT keeps the conv's default bias init (SiT zeroes it)


def test_force_drop_ids_use_the_null_class():
    torch.manual_seed(0)
    sd = _released_layout_weights(dit_layout(4, 64, 2, 4, 10, 16), seed=2)
    m = DiT_models["DiT-Debug/2"](input_size=8, num_classes=10)
    m.load_state_dict(sd)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 200])
    dropped = m.eval()(x, t, torch.tensor([1, 2]), force_drop_ids=torch.tensor([True, False]))[0]
    torch.testing.assert_close(dropped, m(x, t, torch.tensor([10, 2]))[0])
