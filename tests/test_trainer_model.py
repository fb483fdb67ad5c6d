"""Trainer units: official state-dict layout, init, loss on hand-computable cases, data order."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.data.indexed import StepSampler, epoch_permutation
from trainer.models.sit import SiT_models, param_count
from trainer.objectives.interpolant import alpha_sigma, cos_proj_loss, interpolate, ntxent_proj_loss, repa_loss


def official_layout(depth: int, d: int, patch: int, c: int, n_cls: int, tokens: int, z_dims: list[int],
                    proj: int = 2048, mlp_ratio: float = 4.0) -> dict[str, tuple[int, ...]]:
    """The official REPA SiT key/shape list, written out from DESIGN §4."""
    h = int(d * mlp_ratio)
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
    out["final_layer.linear.weight"], out["final_layer.linear.bias"] = (patch * patch * c, d), (patch * patch * c,)
    out["final_layer.adaLN_modulation.1.weight"] = (2 * d, d)
    out["final_layer.adaLN_modulation.1.bias"] = (2 * d,)
    return out


def test_sit_xl2_state_dict_matches_official_layout():
    with torch.device("meta"):  # no memory, no init cost
        m = SiT_models["SiT-XL/2"](input_size=32, in_channels=4, num_classes=1000, encoder_depth=8, z_dims=[768])
    sd = m.state_dict()
    want = official_layout(28, 1152, 2, 4, 1000, 256, [768])
    assert list(sd) == list(want)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert len(sd) == 298 and param_count(m) == 683_242_512
    assert not m.pos_embed.requires_grad


@pytest.mark.parametrize("name,depth,d,patch", [("SiT-B/2", 12, 768, 2), ("SiT-L/4", 24, 1024, 4),
                                                ("SiT-S/8", 12, 384, 8)])
def test_other_sizes_and_two_encoders(name, depth, d, patch):
    with torch.device("meta"):
        m = SiT_models[name](num_classes=10, encoder_depth=4, z_dims=[768, 1024])
    want = official_layout(depth, d, patch, 4, 10, (32 // patch) ** 2, [768, 1024])
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want


def test_official_state_dict_loads_strictly_and_first_output_is_zero():
    torch.manual_seed(0)
    a = SiT_models["SiT-Debug/2"](num_classes=4, z_dims=[64])
    x, t, y = torch.randn(3, 4, 32, 32), torch.rand(3), torch.tensor([0, 1, 4])
    v, zs = a(x, t, y)
    assert torch.equal(v, torch.zeros_like(v))  # adaLN-Zero and zero final layer
    assert len(zs) == 1 and zs[0].shape == (3, 256, 64) and zs[0].abs().sum() > 0
    sd = {k: torch.randn_like(v) for k, v in a.state_dict().items()}  # any official-layout dict
    b = SiT_models["SiT-Debug/2"](num_classes=4, z_dims=[64])
    b.load_state_dict(sd, strict=True)
    assert all(torch.equal(b.state_dict()[k], sd[k]) for k in sd)
    v2, _ = b.eval()(x, t, y=y)
    assert v2.shape == x.shape and v2.abs().sum() > 0


def test_pos_embed_is_mae_sincos():
    m = SiT_models["SiT-Debug/2"](num_classes=2, z_dims=[])
    pe = m.pos_embed[0]  # (T, D)
    d = pe.shape[1]
    # token 1 sits at column 1, row 0: the first half encodes the column (meshgrid(w, h) order), sin first.
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    assert torch.allclose(pe[1, : d // 4].double(), torch.sin(omega), atol=1e-6)
    assert torch.allclose(pe[1, d // 2: 3 * d // 4].double(), torch.zeros(d // 4, dtype=torch.float64), atol=1e-6)


def test_timestep_embedding_cos_then_sin_unscaled():
    from trainer.models.sit import TimestepEmbedder
    e = TimestepEmbedder.timestep_embedding(torch.tensor([0.5]), 256)
    assert torch.allclose(e[0, 0], torch.tensor(math.cos(0.5))) and torch.allclose(e[0, 128], torch.tensor(math.sin(0.5)))


def test_paths():
    t = torch.tensor([0.0, 0.25, 1.0])
    a, s, da, ds = alpha_sigma(t, "linear")
    assert torch.allclose(a, 1 - t) and torch.allclose(s, t) and (da == -1).all() and (ds == 1).all()
    a, s, da, ds = alpha_sigma(t, "cosine")
    assert torch.allclose(a**2 + s**2, torch.ones(3)) and torch.allclose(a[2], torch.tensor(0.0), atol=1e-7)
    h = 1e-4  # derivatives match finite differences
    a2, s2, _, _ = alpha_sigma(t + h, "cosine")
    assert torch.allclose((a2 - a) / h, da, atol=1e-2) and torch.allclose((s2 - s) / h, ds, atol=1e-2)


def test_cos_loss_hand_case():
    h = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    z = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]])
    # token 0: cos = 1/sqrt2, token 1: cos = -1 -> loss = -(0.7071 - 1) / 2
    assert torch.allclose(cos_proj_loss([h], [z]), torch.tensor(-(1 / math.sqrt(2) - 1) / 2))
    # two encoders average
    assert torch.allclose(cos_proj_loss([h, z], [z, z]), torch.tensor((-(1 / math.sqrt(2) - 1) / 2 - 1) / 2))


def test_ntxent_hand_case_negatives_are_same_position_other_samples():
    # N=2 samples, T=2 positions, tau=1. Position 0: h0=z0=e1, h1=z1=e2 -> logits [[1,0],[0,1]].
    # Position 1: h0=e1, h1=e1, z0=e1, z1=e2 -> logits [[1,0],[1,0]]; sample 1 targets index 1.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = torch.stack([torch.stack([e1, e1]), torch.stack([e2, e1])])  # (N, T, D)
    z = torch.stack([torch.stack([e1, e1]), torch.stack([e2, e2])])
    ce_good = math.log(1 + math.exp(-1))  # -log softmax([1, 0])[0]
    ce_bad = math.log(1 + math.exp(1))  # -log softmax([1, 0])[1]
    want = (ce_good + ce_good + ce_good + ce_bad) / 4
    assert torch.allclose(ntxent_proj_loss([h], [z], tau=1.0), torch.tensor(want), atol=1e-6)
    # tau scales the logits
    got = ntxent_proj_loss([h[:, :1]], [z[:, :1]], tau=0.5)
    assert torch.allclose(got, torch.tensor(math.log(1 + math.exp(-2))), atol=1e-6)


class _Probe(torch.nn.Module):
    """A 'model' whose outputs are known functions of its inputs, which it records: v_hat = 2·x_t + t and a
    projection at angle t. Fed the clean x, or a t other than the one that built x_t, the checks below fail."""

    def forward(self, x, t, y):
        self.seen = (x.detach().clone(), t.detach().clone())
        v_hat = 2 * x + t.view(-1, 1, 1, 1)  # (N, C, H, W)
        zhat = torch.stack([torch.cos(t), torch.sin(t)], -1)[:, None]  # (N, 1, 2)
        return v_hat, [zhat]


def test_repa_loss_hand_case():
    """The loss recomputed by hand from what the model saw (however t and ε are drawn): x_t = (1−t)x + tε with
    ε ~ N(0, 1), target v = ε − x, and the projection term at the same t."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    z = torch.tensor([[[1.0, 0.0]]]).expand(3, 1, 2)  # angle 0: cos(zhat, z) = cos(t)
    probe = _Probe()
    out = repa_loss(probe, x, torch.zeros(3, dtype=torch.long), [z], proj_coeff=0.5)
    xt, t = probe.seen
    assert ((0 < t) & (t < 1)).all()
    tt = t.view(-1, 1, 1, 1).double()
    eps = (xt.double() - (1 - tt) * x.double()) / tt  # the noise that built x_t, if x_t is on the linear path
    assert abs(eps.mean()) < 0.2 and abs(eps.std() - 1) < 0.2, (eps.mean(), eps.std())  # N(0,1), not x itself
    assert (eps - x.double()).abs().max() > 1  # the model saw noised data, not the clean x
    want_denoise = ((2 * xt.double() + tt - (eps - x.double())) ** 2).mean()
    want_proj = -torch.cos(t.double()).mean()
    torch.testing.assert_close(out.denoise.double(), want_denoise, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.proj.double(), want_proj, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.total.double(), want_denoise + 0.5 * want_proj, rtol=1e-4, atol=1e-5)
    # What a broken loss would give: another sample's t in the target's x_t, or t scaled by 1000 (DiT's
    # convention) in the projection. Both are far off, so the checks above could not pass by accident.
    eps_wrong_t = (xt.double() - (1 - tt.roll(1, 0)) * x.double()) / tt.roll(1, 0)
    assert not torch.allclose(out.denoise.double(), ((2 * xt.double() + tt - (eps_wrong_t - x.double())) ** 2).mean(),
                              rtol=1e-2)
    assert not torch.allclose(out.proj.double(), -torch.cos(1000 * t.double()).mean(), rtol=1e-2)
    xt2, v = interpolate(x, eps.float(), t, "linear")
    torch.testing.assert_close(xt2, xt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v, eps.float() - x, rtol=1e-4, atol=1e-4)


def test_sampler_disjoint_ranks_and_exact_positions():
    n, batch = 10, 4
    one = [ids for _, _, ids in StepSampler(n, batch, 0, 1, 4, 7, 0, 6)]
    r0 = [(s, ids) for s, _, ids in StepSampler(n, batch, 0, 2, 1, 7, 0, 6)]
    r1 = [(s, ids) for s, _, ids in StepSampler(n, batch, 1, 2, 1, 7, 0, 6)]
    for step in range(6):
        a = np.concatenate([i for s, i in r0 if s == step])
        b = np.concatenate([i for s, i in r1 if s == step])
        assert list(np.concatenate([a, b])) == list(one[step])  # the global batch, split without overlap
    flat = np.concatenate(one)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # whole epochs
    assert list(flat[:10]) != list(flat[10:20])  # reshuffled per epoch
    resumed = [ids for _, _, ids in StepSampler(n, batch, 0, 1, 4, 7, 3, 6)]
    assert all(np.array_equal(a, b) for a, b in zip(one[3:], resumed))  # data position = step
    assert np.array_equal(epoch_permutation(7, 1, n), epoch_permutation(7, 1, n))


def test_registry_resolve_is_what_the_entry_builds():
    """`SiT_models[name].resolve(...)` (the trainer's check before any weight exists) gives the built geometry."""
    for name in ("SiT-Debug/2", "SiT-B/4", "SiT-XL/2"):
        full = SiT_models[name].resolve(z_dims=[768, 1024], encoder_depth=3)
        with torch.device("meta"):
            m = SiT_models[name](z_dims=[768, 1024], encoder_depth=3)
        assert (m.encoder_depth, m.projector_dim, len(m.blocks), m.patch_size, m.z_dims) == (
            full["encoder_depth"], full["projector_dim"], full["depth"], full["patch_size"], full["z_dims"])
    assert SiT_models["SiT-XL/2"].resolve()["encoder_depth"] == 8 and SiT_models["SiT-Debug/2"].resolve()[
        "projector_dim"] == 256  # the SiT default, and the debug entry's own
    with pytest.raises(ValueError, match="conflicts with the registry entry"):
        SiT_models["SiT-XL/2"].resolve(depth=3)
    with pytest.raises(ValueError, match="must be in"):
        SiT_models["SiT-Debug/2"].resolve(encoder_depth=5)
