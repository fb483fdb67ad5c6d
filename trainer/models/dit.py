"""DiT with REPA projectors; the state dict is key-for-key facebookresearch/DiT `models.py` (DESIGN §9).

DiT and SiT share their blocks (SiT took them from DiT), so this file builds DiT from `trainer.models.sit`'s parts.
What differs: the timestep embedder takes integer DDPM timesteps 0..999 (not t in [0, 1]); with `learn_sigma`
the output has 2×C channels (ε, then the variance interpolation v in [−1, 1]); there are no projectors unless
`z_dims` names some (so `DiT_models['DiT-XL/2']()` loads the released checkpoints strictly). The projectors, when
present, are extra keys `projectors.K.{0,2,4}` as in REPA's SiT.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from trainer.models.family import (DEFAULT_VAE, LATENT_DOWNSAMPLE, Family, ModelSpec, Objective, Released,
                                    arg_int, first_of, released_record)
from trainer.models.sit import (DEBUG_SIZE, PROJECTOR_DIM, SIT_KEYS, SIZES, FinalLayer, LabelEmbedder, PatchEmbed,
                                SiT, SiTBlock, TimestepEmbedder, build_mlp, check_geometry, drop_projectors,
                                hint)
from trainer.objectives.ddpm import SCHEDULES, ddpm_repa_loss, noisy, timestep_from_time
from trainer.sampling.ddpm import ddim, ddpm

PATCH_SIZES = (2, 4, 8)  # DiT models.py defines S/B/L/XL at these three


class DiTTimestepEmbedder(TimestepEmbedder):
    """Integer (or fractional) timesteps -> frequencies in float32 -> MLP in the MLP's own dtype.

    SiT's embedder casts the frequencies to t's dtype, which for DiT's int64 timesteps would truncate them; and
    casting t to a low precision first would round it (bf16 holds integers exactly only up to 256).
    """

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.timestep_embedding(t.float(), self.frequency_embedding_size)  # (N, 256) float32
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))  # (N, D)


class DiT(nn.Module):
    """DiT backbone + one REPA projector per encoder, applied after block `encoder_depth` (1-based)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, encoder_depth: int = 8,
                 z_dims: Sequence[int] = (), projector_dim: int = PROJECTOR_DIM):
        super().__init__()
        check_dit_geometry(input_size, patch_size, hidden_size, num_heads, encoder_depth, depth, z_dims)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels  # ε, then v (DiT models.py)
        self.num_classes, self.encoder_depth, self.z_dims = num_classes, encoder_depth, list(z_dims)
        self.projector_dim = projector_dim
        # Registration order = DiT's state-dict order: pos_embed, x/t/y embedders, blocks, (projectors), final.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = DiTTimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table, kept as a frozen Parameter so the key matches the official checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # DiT's initialisation and unpatchify are SiT's (SiT copied them from DiT); shared, not repeated.
    unpatchify = SiT.unpatchify

    def initialize_weights(self) -> None:
        """SiT's init (= DiT's: xavier linears, sin-cos pos_embed, N(0, .02) embeddings, adaLN-Zero), except that
        DiT leaves the patch-embedding conv bias at PyTorch's default, where SiT zeroes it."""
        SiT.initialize_weights(self)
        bias, w = self.x_embedder.proj.bias, self.x_embedder.proj.weight
        bound = 1.0 / math.sqrt(w[0].numel())  # nn.Conv2d.reset_parameters: U(±1/sqrt(fan_in))
        nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (N, C, H, W) latents, t (N,) DDPM timesteps 0..999, y (N,) labels ->
        (out (N, 2C or C, H, W): ε then the variance value v, zs: [(N, T, z_dim)] or [] without projectors)."""
        return SiT.forward(self, x, t, y, force_drop_ids)  # the same embed / blocks / projector / final pass


def check_dit_geometry(input_size: int, patch_size: int, hidden_size: int, num_heads: int, encoder_depth: int,
                       depth: int, z_dims: Sequence[int]) -> None:
    """ValueError for a DiT that cannot be built (checked before any weight exists)."""
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    check_geometry(hidden_size, None, encoder_depth, depth, z_dims)


DIT_DEFAULTS = {k: p.default for k, p in inspect.signature(DiT.__init__).parameters.items() if k != "self"}


def _factory(size: dict, patch: int) -> Callable[..., DiT]:
    """A registry entry: DiT's official keyword names; the size and patch are fixed by the entry's name."""
    def resolve(**kwargs) -> dict[str, Any]:
        """Every DiT argument this entry builds with, given `kwargs` (ValueError as building would), no weights."""
        kw = {**{k: v for k, v in size.items() if k in ("projector_dim", "encoder_depth")}, **kwargs}
        for k, v in {"depth": size["depth"], "hidden_size": size["hidden_size"], "num_heads": size["num_heads"],
                     "patch_size": patch}.items():
            if kw.get(k, v) != v:
                raise ValueError(f"{k}={kw[k]} conflicts with the registry entry ({k}={v})")
            kw[k] = v
        unknown = sorted(set(kw) - set(DIT_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown DiT argument(s) {unknown}; expected some of {sorted(DIT_DEFAULTS)}")
        full = {**DIT_DEFAULTS, **kw}
        check_dit_geometry(full["input_size"], full["patch_size"], full["hidden_size"], full["num_heads"],
                           full["encoder_depth"], full["depth"], full["z_dims"])
        return full

    def make(**kwargs) -> DiT:
        return DiT(**resolve(**kwargs))
    make.resolve = resolve  # type: ignore[attr-defined]
    return make


# Sizes from DiT Table 1 (shared with SiT); DiT-Debug/2 is SiT-Debug/2's CPU size, for tests and benchmarks.
DiT_models: dict[str, Callable[..., DiT]] = {
    f"DiT-{name}/{p}": _factory(size, p) for name, size in SIZES.items() for p in PATCH_SIZES}
DiT_models["DiT-Debug/2"] = _factory(DEBUG_SIZE, 2)


# ---- the family ------------------------------------------------------------------------------------------------

DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"  # DiT download.py
# The released DiT-XL/2 files (plain state dicts of the EMA weights, 1000 classes + the null class), by name.
RELEASED_FILES = {f"DiT-XL-2-{r}x{r}.pt": {"model": "DiT-XL/2", "resolution": r,
                                          "url": DIT_URL.format(f"DiT-XL-2-{r}x{r}.pt")} for r in (256, 512)}
# DiT sample_ddp.py / train.py defaults: what a DiT file that says nothing else was trained with.
RELEASED = dict(model="DiT-XL/2", encoder_depth=8, resolution=256, num_classes=1000, class_dropout_prob=0.1,
                path="linear", vae=DEFAULT_VAE)  # sample_ddp.py --vae ema


def recognises(sd: dict[str, torch.Tensor]) -> bool:
    """A DiT state dict: SiT's modules (DiT's keys are SiT's) and an output with twice the input's channels
    (learned sigma, as every released DiT). A DiT without learned sigma has SiT's shapes: name it with --model."""
    need = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    if not all(k in sd for k in need) or not all(k.startswith(SIT_KEYS) for k in sd):
        return False
    out, (_, in_ch, patch, _) = sd["final_layer.linear.weight"].shape[0], sd["x_embedder.proj.weight"].shape
    return out == 2 * patch * patch * in_ch


def released_config(sd: dict[str, torch.Tensor], spec: ModelSpec, args: dict[str, Any]) -> dict[str, Any]:
    """Our config.json layout for a DiT file without one (DiT's train.py dict with `args`, or a bare state dict):
    flags, then its argparse options (`image_size`, `num_classes`, `model`), then the shapes, then DiT's defaults."""
    pos, embed = sd.get("pos_embed"), sd.get("x_embedder.proj.weight")
    table, final = sd.get("y_embedder.embedding_table.weight"), sd.get("final_layer.linear.weight")
    latent = round(pos.shape[1] ** 0.5) * embed.shape[2] if pos is not None and embed is not None else None
    res = first_of(spec.resolution, arg_int(args, "image_size"), latent and latent * LATENT_DOWNSAMPLE,
                   RELEASED["resolution"])
    in_ch = int(embed.shape[1]) if embed is not None else 4
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    projs = sorted({int(m.group(1)) for k in sd if (m := re.match(r"projectors\.(\d+)\.4\.weight$", k))})
    kwargs: dict[str, Any] = dict(
        input_size=res // LATENT_DOWNSAMPLE, in_channels=in_ch,
        num_classes=first_of(spec.num_classes, arg_int(args, "num_classes"),
                             int(table.shape[0]) - 1 if table is not None else None, RELEASED["num_classes"]),
        learn_sigma=final is None or embed is None or final.shape[0] == 2 * embed.shape[2] ** 2 * in_ch,
        encoder_depth=first_of(spec.encoder_depth, arg_int(args, "encoder_depth"),
                               min(RELEASED["encoder_depth"], depth) if depth else None, RELEASED["encoder_depth"]),
        z_dims=list(first_of(spec.projector_embed_dims, [int(sd[f"projectors.{i}.4.weight"].shape[0])
                                                          for i in projs])),
        class_dropout_prob=RELEASED["class_dropout_prob"])
    if projs and "projectors.0.0.weight" in sd:
        kwargs["projector_dim"] = int(sd["projectors.0.0.weight"].shape[0])
    return released_record(spec, args, kwargs, res, first_of(spec.path, RELEASED["path"]), RELEASED["vae"])


DIT = Family(name="DiT", models=DiT_models, conditioning="class",
             objective=Objective(name="ddpm", paths=SCHEDULES, loss=ddpm_repa_loss, noisy=noisy,
                                 model_time=timestep_from_time),
             # DiT sample.py: 250 respaced DDPM steps; DDIM is deterministic and, like the ODE, needs fewer.
             samplers={"ddpm": ddpm, "ddim": ddim}, steps={"ddpm": 250, "ddim": 50},
             cfg_channels=("all", "3"),
             released=Released(model=RELEASED["model"], recognises=recognises, config=released_config,
                               files=RELEASED_FILES),
             hint=hint, prepare_sampling=drop_projectors)
