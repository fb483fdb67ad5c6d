"""MMDiT with REPA projectors; the state dict is key-for-key the official REPA `models/mmdit.py` (DESIGN §9).

SD3-style joint attention: image tokens and text-context tokens keep separate weights (`x_block`, `context_block`)
but attend over one concatenated sequence, context first. Sizes follow the official rule hidden = 32 * depth,
heads = depth (head dim 32); the last block's context side is `pre_only` (it only feeds keys and values).
Unlike SiT, the official model keeps PyTorch's default initialisation (no adaLN-Zero): only pos_embed is set.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.family import (LATENT_DOWNSAMPLE, Family, ModelSpec, Objective, Released, arg_int, first_of,
                                    released_record)
from trainer.models.sit import (NORM_EPS, PROJECTOR_DIM, FinalLayer, Mlp, PatchEmbed, TimestepEmbedder,
                                build_mlp, check_geometry, drop_projectors, modulate, sincos_pos_embed_2d)
from trainer.objectives.interpolant import PATHS, context_repa_loss, noisy
from trainer.sampling.samplers import ode, sde

CONTEXT_DIM = 768  # CLIP ViT-L/14 text width; official `context_embedder_config` hard-codes Linear(768, hidden)
HEAD_DIM = 32  # official `hidden_size = 32 * depth; num_heads = depth`
QK_NORMS = (None, "ln", "rms")


class RMSNorm(nn.Module):
    """x / rms(x) * weight (official RMSNorm keys: `weight` when affine)."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        # The official leaves this torch.empty (uninitialised); ones is the identity it is meant to start from.
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


def _qk_norm(kind: str | None, head_dim: int) -> nn.Module:
    if kind == "ln":
        return nn.LayerNorm(head_dim, eps=NORM_EPS)
    return RMSNorm(head_dim) if kind == "rms" else nn.Identity()


class JointAttention(nn.Module):
    """One side's qkv (and output proj unless pre_only); the attention itself runs in `JointBlock` over both sides.

    Keys as the official `SelfAttention`: qkv, proj, ln_q, ln_k (per-head norms, absent when qk_norm is None).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, pre_only: bool, qk_norm: str | None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = None if pre_only else nn.Linear(dim, dim)
        self.ln_q, self.ln_k = _qk_norm(qk_norm, self.head_dim), _qk_norm(qk_norm, self.head_dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).unbind(2)  # 3 x (N, T, H, d)
        return self.ln_q(q), self.ln_k(k), v


class DismantledBlock(nn.Module):
    """adaLN-modulated pre-attention and post-attention halves of a DiT block (official `DismantledBlock` keys)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, pre_only: bool,
                 qk_norm: str | None):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.attn = JointAttention(hidden_size, num_heads, qkv_bias, pre_only, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # pre_only needs only the attention input's shift/scale: 2 modulations instead of 6.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        """(q, k, v) each (N, T, H, d), and the modulations post_attention needs (none when pre_only)."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)  # each (N, D)
        return self.attn.qkv_heads(modulate(self.norm1(x), mods[0], mods[1])), list(mods[2:])

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)  # (N, T, D)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)


class JointBlock(nn.Module):
    """Context and image streams attending jointly (official `block_mixing`: context tokens first)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, pre_only: bool,
                 qk_norm: str | None):
        super().__init__()
        self.context_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, pre_only, qk_norm)
        self.x_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, False, qk_norm)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """context (N, L, D), x (N, T, D), c (N, D) -> (context or None after a pre_only block, x)."""
        ctx_qkv, ctx_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_mods = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat([a, b], dim=1).transpose(1, 2) for a, b in zip(ctx_qkv, x_qkv))  # (N, H, L+T, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, L+T, d)
        out = out.transpose(1, 2).flatten(2)  # (N, L+T, D)
        ctx_len = context.shape[1]
        x = self.x_block.post_attention(x, out[:, ctx_len:], x_mods)  # (N, T, D)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, out[:, :ctx_len], ctx_mods), x  # (N, L, D), (N, T, D)


class MMDiTTimestepEmbedder(TimestepEmbedder):
    """SiT's embedder (same keys); the official casts the frequencies to the activations' dtype, not t's."""

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        if t.is_floating_point():
            freq = freq.to(t.dtype)  # official: rounded through t's dtype first
        return self.mlp(freq.to(dtype))  # (N, D)


class VectorEmbedder(nn.Module):
    """Pooled-vector embedding Linear-SiLU-Linear (official `y_embedder` when adm_in_channels is set)."""

    def __init__(self, input_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class MMDiT(nn.Module):
    """MMDiT backbone + one REPA projector per encoder on the image tokens after block `encoder_depth` (1-based).

    Official keyword names. `context_dim` (ours) is the text width the context embedder maps from (768 as the
    official hard-codes). The sin-cos table covers `input_size // patch_size` tokens a side (the official
    hard-codes 16, the only size its crop accepts, which is this at input_size 32, patch 2); smaller inputs
    use its centre.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, depth: int = 24,
                 mlp_ratio: float = 4.0, learn_sigma: bool = False, adm_in_channels: int | None = None,
                 register_length: int = 0, out_channels: int | None = None, pos_embed_max_size: int | None = None,
                 qk_norm: str | None = None, qkv_bias: bool = True, encoder_depth: int = 8,
                 z_dims: Sequence[int] = (768,), projector_dim: int = PROJECTOR_DIM, context_dim: int = CONTEXT_DIM):
        super().__init__()
        hidden_size, num_heads = HEAD_DIM * depth, depth
        grid = input_size // patch_size
        check_mmdit(grid, pos_embed_max_size, qk_norm, hidden_size, encoder_depth, depth, z_dims)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels * (2 if learn_sigma else 1)
        self.pos_embed_max_size, self.num_heads, self.hidden_size = grid, num_heads, hidden_size
        self.encoder_depth, self.z_dims, self.projector_dim = encoder_depth, list(z_dims), projector_dim
        self.context_dim, self.register_length = context_dim, register_length

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = MMDiTTimestepEmbedder(hidden_size)
        self.y_embedder = VectorEmbedder(adm_in_channels, hidden_size) if adm_in_channels is not None else None
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        if register_length > 0:  # learned tokens prepended to the context
            self.register = nn.Parameter(torch.randn(1, register_length, hidden_size))
        # A persistent buffer in the official: in the state dict, not in parameters() (optimizer and EMA skip it).
        self.register_buffer("pos_embed", torch.zeros(1, grid * grid, hidden_size))
        self.joint_blocks = nn.ModuleList([JointBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, i == depth - 1,
                                                      qk_norm) for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in self.z_dims])
        pe = torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid)).float()  # (grid*grid, D)
        self.pos_embed.data.copy_(pe.unsqueeze(0))

    def cropped_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        """The centre h x w patch window of the (grid x grid) table, flattened row-major: (1, h*w, D)."""
        p, g = self.patch_size, self.pos_embed_max_size
        h, w = hw[0] // p, hw[1] // p
        if h > g or w > g:
            raise ValueError(f"input {hw[0]}x{hw[1]} is {h}x{w} patches, more than the {g}x{g} position table "
                             f"(input_size {self.input_size})")
        top, left = (g - h) // 2, (g - w) // 2
        table = self.pos_embed.reshape(1, g, g, -1)[:, top:top + h, left:left + w]  # (1, h, w, D)
        return table.reshape(1, h * w, -1)

    def unpatchify(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(N, h*w, p*p*C) -> (N, C, h*p, w*p)."""
        c, p = self.out_channels, self.patch_size
        h, w = hw[0] // p, hw[1] // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, detach: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (N, C, H, W) latents, t (N,) in [0, 1], context (N, L, context_dim) -> (velocity (N, C', H, W), zs).

        `y` (N, adm_in_channels) is a pooled vector, only for models built with adm_in_channels.
        `detach` stops the REPA loss's gradient at the projector input, as the official option does.
        """
        if context is None:
            raise ValueError("MMDiT needs a text context (N, L, context_dim); use the empty-caption context for "
                             "the unconditional branch")
        hw = (x.shape[-2], x.shape[-1])
        x = self.x_embedder(x) + self.cropped_pos_embed(hw)  # (N, T, D)
        c = self.t_embedder(t, dtype=x.dtype)  # (N, D)
        if y is not None:
            if self.y_embedder is None:
                raise ValueError("this MMDiT has no pooled-vector embedder (adm_in_channels=None); pass y=None")
            c = c + self.y_embedder(y)  # (N, D)
        context = self.context_embedder(context)  # (N, L, D)
        if self.register_length > 0:
            context = torch.cat([self.register.expand(x.shape[0], -1, -1), context], dim=1)  # (N, R+L, D)
        n, tokens, d = x.shape
        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.joint_blocks):
            context, x = block(context, x, c)  # (N, L, D) (None after the last block), (N, T, D)
            if i + 1 == self.encoder_depth:
                h = (x.detach() if detach else x).reshape(-1, d)  # (N*T, D)
                zs = [proj(h).reshape(n, tokens, -1) for proj in self.projectors]  # (N, T, z_dim)
        x = self.final_layer(x, c)  # (N, T, p*p*C')
        return self.unpatchify(x, hw), zs


def check_mmdit(grid: int, pos_embed_max_size: int | None, qk_norm: str | None, hidden_size: int,
                encoder_depth: int, depth: int, z_dims: Sequence[int]) -> None:
    """ValueError for an MMDiT that cannot be built (checked before any weight exists)."""
    if pos_embed_max_size is not None and pos_embed_max_size != grid:
        raise ValueError(f"pos_embed_max_size {pos_embed_max_size} must equal input_size // patch_size = {grid} "
                         f"(the official table is input_size // patch_size a side, cropped for smaller inputs)")
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm {qk_norm!r} must be one of {QK_NORMS}")
    check_geometry(hidden_size, None, encoder_depth, depth, z_dims)


def recognises(sd: dict[str, torch.Tensor]) -> bool:
    """An MMDiT state dict (ours or official): joint blocks and a context embedder."""
    return all(k in sd for k in ("pos_embed", "context_embedder.weight", "joint_blocks.0.x_block.attn.qkv.weight",
                                 "final_layer.linear.weight"))


def kwargs_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The constructor arguments a state dict's shapes record (all but encoder_depth, which places the projectors
    without changing a shape: official files keep it in `args.encoder_depth`)."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("joint_blocks.")})
    d, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    n_proj = len({k.split(".")[1] for k in sd if k.startswith("projectors.")})
    qk = "joint_blocks.0.x_block.attn.ln_q.weight"
    kw: dict[str, Any] = dict(
        input_size=round(sd["pos_embed"].shape[1] ** 0.5) * patch, patch_size=patch, in_channels=in_ch, depth=depth,
        mlp_ratio=sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / d,
        out_channels=sd["final_layer.linear.weight"].shape[0] // (patch * patch),
        adm_in_channels=sd["y_embedder.mlp.0.weight"].shape[1] if "y_embedder.mlp.0.weight" in sd else None,
        register_length=sd["register"].shape[1] if "register" in sd else 0,
        qk_norm=None if qk not in sd else "ln" if qk.replace("weight", "bias") in sd else "rms",
        qkv_bias="joint_blocks.0.x_block.attn.qkv.bias" in sd,
        z_dims=[sd[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)],
        context_dim=sd["context_embedder.weight"].shape[1])
    if n_proj:
        kw["projector_dim"] = sd["projectors.0.0.weight"].shape[0]
    return kw


# Official sizes: MMDiT/2 is train_t2i.py's model (depth 24 -> hidden 768, 24 heads, REPA after block 8 as its
# README's command; the context embedder fixed to CLIP ViT-L/14's 768 as the official hard-codes). The debug entry
# is CPU-sized through the same hidden = 32 * depth rule (depth 4 -> hidden 128, 4 heads) and takes any text width.
MMDIT_SIZE = dict(depth=24, encoder_depth=8, context_dim=CONTEXT_DIM)
DEBUG_SIZE = dict(depth=4, projector_dim=256, encoder_depth=2)
FIXED = ("depth", "context_dim")  # what a size entry pins (besides the patch); encoder/projector are defaults
MMDIT_DEFAULTS = {k: p.default for k, p in inspect.signature(MMDiT.__init__).parameters.items() if k != "self"}


def _factory(size: dict, patch: int) -> Callable[..., MMDiT]:
    def resolve(**kwargs) -> dict[str, Any]:
        """Every MMDiT argument this entry builds with, given `kwargs` (ValueError as building would), no weights."""
        kw = {**{k: v for k, v in size.items() if k in ("projector_dim", "encoder_depth")}, **kwargs}
        for k, v in {**{k: size[k] for k in FIXED if k in size}, "patch_size": patch}.items():
            if kw.get(k, v) != v:
                raise ValueError(f"{k}={kw[k]} conflicts with the registry entry ({k}={v})")
            kw[k] = v
        unknown = sorted(set(kw) - set(MMDIT_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown MMDiT argument(s) {unknown}")
        full = {**MMDIT_DEFAULTS, **kw}
        check_mmdit(full["input_size"] // patch, full["pos_embed_max_size"], full["qk_norm"], HEAD_DIM * full["depth"],
                    full["encoder_depth"], full["depth"], full["z_dims"])
        return full

    def make(**kwargs) -> MMDiT:
        return MMDiT(**resolve(**kwargs))
    make.resolve = resolve  # type: ignore[attr-defined]
    return make


MMDiT_models: dict[str, Callable[..., MMDiT]] = {"MMDiT/2": _factory(MMDIT_SIZE, 2),
                                                 "MMDiT-Debug/2": _factory(DEBUG_SIZE, 2)}


# ---- the family ------------------------------------------------------------------------------------------------

# REPA train_t2i.py defaults: what an MMDiT file that says nothing else was trained with (its VAE is sd-vae-ft-mse).
RELEASED = dict(model="MMDiT/2", encoder_depth=8, resolution=256, path="linear", vae="sd-vae-ft-mse")


def released_config(sd: dict[str, torch.Tensor], spec: ModelSpec, args: dict[str, Any]) -> dict[str, Any]:
    """Our config.json layout for an MMDiT file without one (train_t2i.py's dict with `args`, or a bare state dict):
    flags, then its argparse options (`resolution`, `encoder_depth`, `path_type`), then the shapes, then defaults."""
    kw = kwargs_from_state_dict(sd) if recognises(sd) else {}
    shape_res = kw["input_size"] * LATENT_DOWNSAMPLE if kw else None
    res = first_of(spec.resolution, arg_int(args, "resolution"), shape_res, RELEASED["resolution"])
    depth = kw.get("depth", MMDIT_SIZE["depth"])
    kw.update(input_size=res // LATENT_DOWNSAMPLE,
              encoder_depth=first_of(spec.encoder_depth, arg_int(args, "encoder_depth"),
                                     min(RELEASED["encoder_depth"], depth)))
    kw["z_dims"] = list(first_of(spec.projector_embed_dims, kw.get("z_dims"), [768]))
    kw.pop("depth", None)  # the size entry pins it (and patch_size); shapes pick the entry (_detect_size)
    kw.pop("patch_size", None)
    return released_record(spec, args, kw, res, first_of(spec.path, args.get("path_type"), RELEASED["path"]),
                           RELEASED["vae"])


def hint(key: str) -> str:
    """Which flag most likely fixes a state-dict mismatch at this key."""
    if key.startswith("context_embedder."):
        return "check the text encoder's width: the manifest's context field (--text-encoder)"
    if key.startswith("projectors."):
        return "check --projector-embed-dims"
    if key.startswith(("pos_embed", "x_embedder.")):
        return "check --resolution and --model"
    if key.startswith("joint_blocks."):
        return "check --model and --encoder-depth"
    return "check --model"


MMDIT = Family(name="MMDiT", models=MMDiT_models, conditioning="text",
               objective=Objective(name="interpolant", paths=PATHS, loss=context_repa_loss, noisy=noisy),
               # generate_t2i.py: ODE 50 steps by default (Table 12 also reports SDE 250)
               samplers={"ode": ode, "sde": sde}, steps={"ode": 50, "sde": 250},
               released=Released(model=RELEASED["model"], recognises=recognises, config=released_config),
               hint=hint, prepare_sampling=drop_projectors)
