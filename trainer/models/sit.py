"""SiT with REPA projectors and the SiT family record; the state dict is key-for-key the official REPA
`models/sit.py` (DESIGN §4), so its released checkpoints load strictly."""
from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.family import (DEFAULT_VAE, LATENT_DOWNSAMPLE, Family, ModelSpec, Objective, Released,
                                    arg_int, first_of, released_record)
from trainer.objectives.interpolant import PATHS, noisy, repa_loss
from trainer.sampling.samplers import ode, sde

FREQ_EMBED_DIM = 256  # SiT/DiT TimestepEmbedder frequency_embedding_size
MAX_PERIOD = 10000  # SiT/DiT TimestepEmbedder max_period
PROJECTOR_DIM = 2048  # REPA train.py --projector-dim default
NORM_EPS = 1e-6  # DiT/SiT LayerNorm eps


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x*(1+scale)+shift with per-sample (N, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear-SiLU-Linear-SiLU-Linear (keys .0 .2 .4)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


class PatchEmbed(nn.Module):
    """Conv patchify (timm PatchEmbed layout: key `proj`), without importing timm (seconds per process)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (timm Attention keys: qkv, proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, H, T, d)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (N, H, T, d)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm Mlp keys)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (unscaled) -> 256 sinusoidal frequencies [cos, sin] -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQ_EMBED_DIM):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = MAX_PERIOD) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb  # (N, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with a null class at index num_classes (for CFG); drops labels in training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`force_drop_ids` (N,) bool: the trainer's drops, drawn per sample outside any compiled region."""
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids, torch.full_like(labels, self.num_classes), labels)
        elif train and self.dropout_prob > 0:
            # The only place labels are dropped (once, p=class_dropout_prob), as in the official SiT.
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN then a linear map to patch_size^2 * out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT 2-D sin-cos table (grid*grid, dim); meshgrid(w, h) order as in the official code."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)


def check_geometry(hidden_size: int, decoder_hidden_size: int | None, encoder_depth: int, depth: int,
                   z_dims: Sequence[int]) -> None:
    """ValueError for a SiT that cannot be built (checked before any weight exists)."""
    if decoder_hidden_size not in (None, hidden_size):
        raise ValueError(f"decoder_hidden_size {decoder_hidden_size} != hidden_size {hidden_size} is unsupported")
    if z_dims and not 1 <= encoder_depth <= depth:
        raise ValueError(f"encoder_depth {encoder_depth} must be in [1, depth={depth}]")


class SiT(nn.Module):
    """SiT backbone + one REPA projector per encoder, applied after block `encoder_depth` (1-based)."""

    def __init__(self, path_type: str = "linear", input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, decoder_hidden_size: int | None = None, encoder_depth: int = 8,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, use_cfg: bool = False, z_dims: Sequence[int] = (768,),
                 projector_dim: int = PROJECTOR_DIM, qk_norm: bool = False, fused_attn: bool = True):
        super().__init__()
        check_geometry(hidden_size, decoder_hidden_size, encoder_depth, depth, z_dims)
        self.path_type, self.input_size, self.patch_size = path_type, input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.num_classes, self.encoder_depth, self.z_dims = num_classes, encoder_depth, list(z_dims)
        self.projector_dim = projector_dim
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table, kept as a frozen Parameter so the key matches the official checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm)
                                     for _ in range(depth)])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, sin-cos pos_embed, N(0, .02) embeddings, zero adaLN and final layer (SiT init)."""
        def xavier(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(xavier)
        grid = int(self.x_embedder.num_patches ** 0.5)
        pe = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                        self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (N, C, H, W) latents, t (N,) in [0, 1], y (N,) labels -> (velocity (N, C, H, W), zs)."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        n, tokens, d = x.shape
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)  # (N, T, D)
            if i + 1 == self.encoder_depth:
                zs = [proj(x.reshape(-1, d)).reshape(n, tokens, -1) for proj in self.projectors]  # (N, T, z_dim)
        x = self.final_layer(x, c)  # (N, T, p*p*C)
        return self.unpatchify(x), zs


# Sizes from DiT/SiT Table 1; the debug entry is CPU-sized for tests and the demo.
SIZES = {"S": dict(depth=12, hidden_size=384, num_heads=6), "B": dict(depth=12, hidden_size=768, num_heads=12),
         "L": dict(depth=24, hidden_size=1024, num_heads=16), "XL": dict(depth=28, hidden_size=1152, num_heads=16)}
DEBUG_SIZE = dict(depth=4, hidden_size=64, num_heads=4, projector_dim=256, encoder_depth=2)


def _factory(size: dict, patch: int) -> Callable[..., SiT]:
    def resolve(**kwargs) -> dict[str, Any]:
        """Every SiT argument this entry builds with, given `kwargs` (ValueError as building would), no weights."""
        kw = {**{k: v for k, v in size.items() if k in ("projector_dim", "encoder_depth")}, **kwargs}
        for k, v in {"depth": size["depth"], "hidden_size": size["hidden_size"], "num_heads": size["num_heads"],
                     "patch_size": patch}.items():
            if kw.get(k, v) != v:
                raise ValueError(f"{k}={kw[k]} conflicts with the registry entry ({k}={v})")
            kw[k] = v
        full = {**SIT_DEFAULTS, **kw}
        check_geometry(full["hidden_size"], full["decoder_hidden_size"], full["encoder_depth"], full["depth"],
                       full["z_dims"])
        return full

    def make(**kwargs) -> SiT:
        return SiT(**resolve(**kwargs))
    make.resolve = resolve  # type: ignore[attr-defined]
    return make


SIT_DEFAULTS = {k: p.default for k, p in inspect.signature(SiT.__init__).parameters.items() if k != "self"}


SiT_models: dict[str, Callable[..., SiT]] = {
    f"SiT-{name}/{p}": _factory(size, p) for name, size in SIZES.items() for p in (1, 2, 4, 8)}
SiT_models["SiT-Debug/2"] = _factory(DEBUG_SIZE, 2)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the family ------------------------------------------------------------------------------------------------

# REPA train.py / generate.py defaults: what an official file that says nothing else was trained with.
RELEASED = dict(model="SiT-XL/2", encoder_depth=8, z_dims=[768], resolution=256, num_classes=1000,
                class_dropout_prob=0.1, path="linear", vae=DEFAULT_VAE)

SIT_KEYS = ("pos_embed", "x_embedder.", "t_embedder.", "y_embedder.", "blocks.", "projectors.", "final_layer.")


def recognises(sd: dict[str, torch.Tensor]) -> bool:
    """A SiT state dict: only SiT's modules, with patch and label embedders, a pos_embed, and an output with as many
    channels as the input (DiT's learned sigma doubles them)."""
    need = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    if not all(k in sd for k in need) or not all(k.startswith(SIT_KEYS) for k in sd):
        return False
    out, (_, in_ch, patch, _) = sd["final_layer.linear.weight"].shape[0], sd["x_embedder.proj.weight"].shape
    return out == patch * patch * in_ch


def released_config(sd: dict[str, torch.Tensor], spec: ModelSpec, args: dict[str, Any]) -> dict[str, Any]:
    """Our config.json layout for an official REPA file: flags, then its argparse options, then the state-dict
    shapes, then REPA's defaults (RELEASED). The shapes decide what no option records (projectors, channels)."""
    pos, embed = sd.get("pos_embed"), sd.get("x_embedder.proj.weight")
    table = sd.get("y_embedder.embedding_table.weight")
    latent = round(pos.shape[1] ** 0.5) * embed.shape[2] if pos is not None and embed is not None else None
    res = first_of(spec.resolution, arg_int(args, "resolution"), latent and latent * LATENT_DOWNSAMPLE,
                 RELEASED["resolution"])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    projs = sorted({int(m.group(1)) for k in sd if (m := re.match(r"projectors\.(\d+)\.4\.weight$", k))})
    shape_dims = [int(sd[f"projectors.{i}.4.weight"].shape[0]) for i in projs] if depth else None
    kwargs: dict[str, Any] = dict(
        input_size=res // LATENT_DOWNSAMPLE, in_channels=int(embed.shape[1]) if embed is not None else 4,
        num_classes=first_of(spec.num_classes, arg_int(args, "num_classes"),
                           int(table.shape[0]) - 1 if table is not None else None, RELEASED["num_classes"]),
        # The encoder depth only places the projectors; a bare file does not record it, so REPA's 8 (or the
        # model's depth, if shallower) stands in unless a flag or the file's options say otherwise.
        encoder_depth=first_of(spec.encoder_depth, arg_int(args, "encoder_depth"),
                             min(RELEASED["encoder_depth"], depth) if depth else None, RELEASED["encoder_depth"]),
        z_dims=list(first_of(spec.projector_embed_dims, shape_dims, RELEASED["z_dims"])),
        class_dropout_prob=RELEASED["class_dropout_prob"])
    if projs and "projectors.0.0.weight" in sd:
        kwargs["projector_dim"] = int(sd["projectors.0.0.weight"].shape[0])
    return released_record(spec, args, kwargs, res, first_of(spec.path, args.get("path_type"), RELEASED["path"]),
                           RELEASED["vae"])


def hint(key: str) -> str:
    """Which flag most likely fixes a state-dict mismatch at this key."""
    if key.startswith("projectors."):
        return "check --projector-embed-dims"
    if key.startswith("y_embedder."):
        return "check --num-classes"
    if key.startswith("pos_embed") or key.startswith("x_embedder."):
        return "check --resolution and --model"
    if key.startswith("blocks."):
        return "check --model and --encoder-depth"
    return "check --model"


def drop_projectors(model: SiT) -> None:
    """The projectors only feed the training loss: sampling does not pay for them (~4% of XL/2)."""
    model.projectors = nn.ModuleList()


SIT = Family(name="SiT", models=SiT_models, conditioning="class",
             objective=Objective(name="interpolant", paths=PATHS, loss=repa_loss, noisy=noisy),
             samplers={"sde": sde, "ode": ode}, steps={"sde": 250, "ode": 50},  # REPA generate.py: SDE 250, ODE 50
             released=Released(model=RELEASED["model"], recognises=recognises, config=released_config),
             hint=hint, prepare_sampling=drop_projectors)
