"""MMDiT: the official REPA `models/mmdit.py` state-dict layout, and the forward against one written out here."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.models.mmdit import MMDiT_models


def official_layout(depth: int, c: int = 4, patch: int = 2, tokens: int = 256, z_dims=(768,), proj: int = 2048,
                    ctx: int = 768, out_c: int | None = None, qk_norm: str | None = None, adm: int | None = None,
                    register: int = 0) -> dict[str, tuple[int, ...]]:
    """The official MMDiT key/shape list in state-dict order, written out from REPA `models/mmdit.py`:
    hidden 32*depth, MLP 4x, qkv with bias, last context block pre_only (qkv + 2 modulations only)."""
    d, h, hd = 32 * depth, 4 * 32 * depth, 32
    out_c = out_c or c
    out: dict[str, tuple[int, ...]] = {}

    def lin(key: str, o: int, i: int) -> None:
        out[f"{key}.weight"], out[f"{key}.bias"] = (o, i), (o,)

    if register:
        out["register"] = (1, register, d)
    out["pos_embed"] = (1, tokens, d)
    out["x_embedder.proj.weight"], out["x_embedder.proj.bias"] = (d, c, patch, patch), (d,)
    lin("t_embedder.mlp.0", d, 256)
    lin("t_embedder.mlp.2", d, d)
    if adm:
        lin("y_embedder.mlp.0", d, adm)
        lin("y_embedder.mlp.2", d, d)
    lin("context_embedder", d, ctx)
    for i in range(depth):
        for side in ("context_block", "x_block"):
            pre_only = side == "context_block" and i == depth - 1
            b = f"joint_blocks.{i}.{side}"
            lin(f"{b}.attn.qkv", 3 * d, d)
            if not pre_only:
                lin(f"{b}.attn.proj", d, d)
            for norm in ("ln_q", "ln_k"):
                if qk_norm == "ln":
                    out[f"{b}.attn.{norm}.weight"], out[f"{b}.attn.{norm}.bias"] = (hd,), (hd,)
                elif qk_norm == "rms":
                    out[f"{b}.attn.{norm}.weight"] = (hd,)
            if not pre_only:
                lin(f"{b}.mlp.fc1", h, d)
                lin(f"{b}.mlp.fc2", d, h)
            lin(f"{b}.adaLN_modulation.1", (2 if pre_only else 6) * d, d)
    lin("final_layer.linear", patch * patch * out_c, d)
    lin("final_layer.adaLN_modulation.1", 2 * d, d)
    for k, z in enumerate(z_dims):
        lin(f"projectors.{k}.0", proj, d)
        lin(f"projectors.{k}.2", proj, proj)
        lin(f"projectors.{k}.4", z, proj)
    return out


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_mmdit_2_layout_and_parameter_count():
    with torch.device("meta"):
        m = MMDiT_models["MMDiT/2"](input_size=32, z_dims=[768], encoder_depth=8)
    want = official_layout(24)
    assert list(m.state_dict()) == list(want) and shapes(m) == want
    assert (m.hidden_size, m.num_heads, len(m.joint_blocks), m.encoder_depth) == (768, 24, 24, 8)
    # By hand, d = 768: patchify 4*2*2*d+d, t-MLP 256d+d+d*d+d, context 768d+d; a full half-block qkv+proj+fc1+fc2
    # +6 modulations; the pre_only half qkv + 2 modulations; final 16d+16 + 2 modulations; projector 768-2048-2048-768.
    d = 768
    full = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    pre_only = (3 * d * d + 3 * d) + (2 * d * d + 2 * d)
    projector = (d * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 768 + 768)
    count = (16 * d + d) + (256 * d + d + d * d + d) + (768 * d + d) + 47 * full + pre_only + (
        16 * d + 16 + 2 * d * d + 2 * d) + projector
    assert count == 512_415_504
    assert sum(p.numel() for p in m.parameters()) == count  # pos_embed is a buffer, not a parameter
    assert "pos_embed" not in dict(m.named_parameters())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # z_dims=[0]: the vanilla official layout
def test_debug_layout_variants_and_strict_load_of_official_dict():
    m = MMDiT_models["MMDiT-Debug/2"](z_dims=[64, 32])
    want = official_layout(4, z_dims=(64, 32), proj=256)
    assert list(m.state_dict()) == list(want) and shapes(m) == want
    # Official options: qk-norm (LayerNorm and RMS per head), learned sigma, pooled vector, registers, the vanilla
    # (no-REPA) train_t2i layout z_dims=[0], and a 16-wide context.
    for kw, lay in [(dict(qk_norm="ln"), dict(qk_norm="ln")), (dict(qk_norm="rms"), dict(qk_norm="rms")),
                    (dict(learn_sigma=True, adm_in_channels=8, register_length=3),
                     dict(out_c=8, adm=8, register=3)),
                    (dict(z_dims=[0], context_dim=16), dict(z_dims=(0,), ctx=16))]:
        m = MMDiT_models["MMDiT-Debug/2"](**{"z_dims": [64], **kw})
        want = official_layout(4, **{"z_dims": (64,), "proj": 256, **lay})
        assert list(m.state_dict()) == list(want) and shapes(m) == want, kw
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in official_layout(4, z_dims=(64,), proj=256).items()}
    m = MMDiT_models["MMDiT-Debug/2"](z_dims=[64])
    m.load_state_dict(sd, strict=True)
    assert all(torch.equal(m.state_dict()[k], sd[k]) for k in sd)


def test_pos_embed_is_mae_sincos_on_a_16_grid():
    m = MMDiT_models["MMDiT-Debug/2"](z_dims=[])
    pe, d = m.pos_embed[0].double(), m.hidden_size  # (256, D)
    assert pe.shape == (256, d)
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    for token in (1, 16, 16 * 5 + 9):
        row, col = divmod(token, 16)  # first half: the column (meshgrid(w, h) order), then the row; sin then cos
        want = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega),
                          torch.cos(row * omega)])
        assert torch.allclose(pe[token], want, atol=1e-6)


# ---- the forward, written out in plain torch ops over the state dict ------------------------------------------

def _layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _linear(sd: dict, key: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[f"{key}.weight"].T + sd[f"{key}.bias"]


def _mlp2(sd: dict, key: str, x: torch.Tensor, act) -> torch.Tensor:
    return _linear(sd, f"{key}.2", act(_linear(sd, f"{key}.0", x)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def reference_forward(sd: dict, x, t, ctx, *, depth: int, enc_depth: int, grid: int = 16, out_c: int = 4,
                      qk_norm: str | None = None, y=None, n_proj: int = 1):
    """Official MMDiT forward (REPA models/mmdit.py) over the state dict -> (output, zs, hidden after enc_depth)."""
    d, heads, hd, p = 32 * depth, depth, 32, 2
    n, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    patches = x.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p * p)  # row-major tokens
    tok = patches @ sd["x_embedder.proj.weight"].reshape(d, -1).T + sd["x_embedder.proj.bias"]
    top, left = (grid - h) // 2, (grid - w) // 2
    tok = tok + sd["pos_embed"].reshape(grid, grid, d)[top:top + h, left:left + w].reshape(h * w, d)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    cond = _mlp2(sd, "t_embedder.mlp", torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1),
                 _silu)
    if y is not None:
        cond = cond + _mlp2(sd, "y_embedder.mlp", y, _silu)
    cx = _linear(sd, "context_embedder", ctx)
    if "register" in sd:
        cx = torch.cat([sd["register"].expand(n, -1, -1), cx], 1)

    def norm_heads(key: str, a: torch.Tensor) -> torch.Tensor:  # a (N, T, H, hd)
        if qk_norm == "ln":
            return _layer_norm(a) * sd[f"{key}.weight"] + sd[f"{key}.bias"]
        if qk_norm == "rms":
            return a / torch.sqrt((a ** 2).mean(-1, keepdim=True) + 1e-6) * sd[f"{key}.weight"]
        return a

    def pre(b: str, s: torch.Tensor, n_mod: int):
        mods = _linear(sd, f"{b}.adaLN_modulation.1", _silu(cond)).chunk(n_mod, -1)
        a = _layer_norm(s) * (1 + mods[1][:, None]) + mods[0][:, None]
        q, k, v = _linear(sd, f"{b}.attn.qkv", a).reshape(n, s.shape[1], 3, heads, hd).unbind(2)
        return norm_heads(f"{b}.attn.ln_q", q), norm_heads(f"{b}.attn.ln_k", k), v, mods

    def post(b: str, s, o, mods):
        s = s + mods[2][:, None] * _linear(sd, f"{b}.attn.proj", o)
        a = _layer_norm(s) * (1 + mods[4][:, None]) + mods[3][:, None]
        return s + mods[5][:, None] * _linear(sd, f"{b}.mlp.fc2", _gelu_tanh(_linear(sd, f"{b}.mlp.fc1", a)))

    hidden = None
    for i in range(depth):
        last = i == depth - 1
        cq, ck, cv, cm = pre(f"joint_blocks.{i}.context_block", cx, 2 if last else 6)
        xq, xk, xv, xm = pre(f"joint_blocks.{i}.x_block", tok, 6)
        q, k, v = (torch.cat([a, b], 1).permute(0, 2, 1, 3) for a, b in ((cq, xq), (ck, xk), (cv, xv)))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v  # (N, H, L+T, hd)
        att = att.permute(0, 2, 1, 3).reshape(n, -1, d)
        tok_new = post(f"joint_blocks.{i}.x_block", tok, att[:, cx.shape[1]:], xm)
        if not last:
            cx = post(f"joint_blocks.{i}.context_block", cx, att[:, :cx.shape[1]], cm)
        tok = tok_new
        if i + 1 == enc_depth:
            hidden = tok
    zs = [_linear(sd, f"projectors.{j}.4", _silu(_linear(sd, f"projectors.{j}.2", _silu(
        _linear(sd, f"projectors.{j}.0", hidden))))) for j in range(n_proj)]
    shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", _silu(cond)).chunk(2, -1)
    out = _linear(sd, "final_layer.linear", _layer_norm(tok) * (1 + scale[:, None]) + shift[:, None])
    img = out.reshape(n, h, w, p, p, out_c).permute(0, 5, 1, 3, 2, 4).reshape(n, out_c, h * p, w * p)
    return img, zs, hidden


def _random_model(**kw):
    torch.manual_seed(1)
    m = MMDiT_models["MMDiT-Debug/2"](**kw)
    g = torch.Generator().manual_seed(2)
    # Random official-layout weights, scaled so that 4 blocks neither vanish nor blow up.
    sd = {k: (torch.randn(v.shape, generator=g) * (0.5 if v.dim() == 1 else 1 / math.sqrt(v.shape[-1])))
          for k, v in m.state_dict().items() if k != "pos_embed"}
    sd["pos_embed"] = m.pos_embed.clone()
    m.load_state_dict(sd, strict=True)
    return m.eval(), sd


@pytest.mark.parametrize("hw,kw", [((8, 8), {}), ((32, 32), {}), ((8, 12), dict(qk_norm="ln")),
                                   ((6, 10), dict(qk_norm="rms", learn_sigma=True, adm_in_channels=5,
                                                  register_length=2))])
def test_forward_matches_written_out_reference(hw, kw):
    m, sd = _random_model(z_dims=[64, 24], context_dim=16, **kw)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, *hw, generator=g), torch.rand(2, generator=g), torch.randn(2, 7, 16, generator=g)
    y = torch.randn(2, 5, generator=g) if "adm_in_channels" in kw else None
    with torch.no_grad():
        out, zs = m(x, t, y=y, context=ctx)
        want, want_zs, _ = reference_forward(sd, x, t, ctx, depth=4, enc_depth=2, out_c=m.out_channels,
                                             qk_norm=kw.get("qk_norm"), y=y, n_proj=2)
    assert out.shape == (2, m.out_channels, *hw) and out.abs().mean() > 1e-2
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert [z.shape for z in zs] == [(2, hw[0] * hw[1] // 4, 64), (2, hw[0] * hw[1] // 4, 24)]
    for a, b in zip(zs, want_zs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_zs_come_from_image_tokens_after_encoder_depth():
    m, sd = _random_model(z_dims=[64], context_dim=16, encoder_depth=3)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 16)
    seen = {}

    def keep(mod, args, out) -> None:  # a hook that returned a value would replace the block's output
        seen["x"] = out[1]
    m.joint_blocks[2].register_forward_hook(keep)
    _, zs = m(x, t, context=ctx)
    assert seen["x"].shape == (2, 16, m.hidden_size)  # the image tokens only, not the 5 context tokens
    torch.testing.assert_close(zs[0], m.projectors[0](seen["x"]))
    with torch.no_grad():
        _, want_zs, hidden = reference_forward(sd, x, t, ctx, depth=4, enc_depth=3)
    torch.testing.assert_close(seen["x"], hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zs[0], want_zs[0], rtol=1e-5, atol=1e-5)
    # detach=True: same values, but the projection loss no longer reaches the blocks.
    _, zs_d = m(x, t, context=ctx, detach=True)
    torch.testing.assert_close(zs_d[0], zs[0])
    zs_d[0].sum().backward()
    assert m.joint_blocks[0].x_block.attn.qkv.weight.grad is None and m.projectors[0][0].weight.grad is not None


def test_empty_context_changes_the_output_and_inputs_are_checked():
    m, _ = _random_model(z_dims=[64])
    x, t = torch.randn(1, 4, 8, 8), torch.rand(1)
    a, _ = m(x, t, context=torch.randn(1, 77, 768))
    b, _ = m(x, t, context=torch.zeros(1, 77, 768))
    assert not torch.allclose(a, b)  # the text reaches the image tokens through the joint attention
    with pytest.raises(ValueError, match="needs a text context"):
        m(x, t)
    with pytest.raises(ValueError, match="position table"):
        m(torch.randn(1, 4, 34, 34), t, context=torch.zeros(1, 77, 768))
    with pytest.raises(ValueError, match="no pooled-vector embedder"):
        m(x, t, y=torch.zeros(1, 3), context=torch.zeros(1, 77, 768))


def test_registry_resolve_and_conflicts():
    entry = MMDiT_models["MMDiT/2"]
    full = entry.resolve(input_size=32, z_dims=[768], encoder_depth=8)
    assert (full["depth"], full["patch_size"], full["projector_dim"], full["context_dim"]) == (24, 2, 2048, 768)
    assert MMDiT_models["MMDiT-Debug/2"].resolve()["encoder_depth"] == 2
    m = MMDiT_models["MMDiT-Debug/2"](z_dims=[8])
    assert (m.hidden_size, m.num_heads, m.pos_embed_max_size, m.projector_dim) == (128, 4, 16, 256)
    assert m.joint_blocks[-1].context_block.pre_only and not m.joint_blocks[-2].context_block.pre_only
    for bad, match in [(dict(depth=12), "conflicts with the registry entry"), (dict(encoder_depth=25), "must be in"),
                       (dict(pos_embed_max_size=32), "pos_embed_max_size"), (dict(qk_norm="l2"), "qk_norm"),
                       (dict(hidden_size=1152), "unknown MMDiT argument")]:
        with pytest.raises(ValueError, match=match):
            entry.resolve(**bad)
    assert MMDiT_models["MMDiT/2"].resolve(input_size=64)["input_size"] == 64  # a 32x32 table for 512 px


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_state_dict_records_the_constructor_arguments():
    from trainer.models.mmdit import MMDiT, kwargs_from_state_dict, recognises
    from trainer.models.sit import SiT_models
    for kw in [dict(z_dims=[64, 32]), dict(z_dims=[0], qk_norm="ln", context_dim=16),
               dict(z_dims=[], qk_norm="rms", learn_sigma=True, adm_in_channels=8, register_length=3, qkv_bias=False,
                    input_size=16, mlp_ratio=2.0)]:
        sd = MMDiT_models["MMDiT-Debug/2"](**kw).state_dict()
        assert recognises(sd)
        rebuilt = MMDiT(**kwargs_from_state_dict(sd), encoder_depth=2)
        assert {k: tuple(v.shape) for k, v in sd.items()} == shapes(rebuilt), kw
    with torch.device("meta"):
        assert kwargs_from_state_dict(MMDiT_models["MMDiT/2"]().state_dict())["depth"] == 24
    assert not recognises(SiT_models["SiT-Debug/2"](num_classes=2, z_dims=[]).state_dict())
