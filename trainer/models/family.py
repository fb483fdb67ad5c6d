"""What a model family declares: its sizes, conditioning, objective, samplers and released checkpoints.

A family is one record (`Family`) in the file that defines its network (SiT: trainer/models/sit.py) plus one line
in trainer/models/registry.py. The training loop, the sampling job, the alignment analysis and the checkpoint
loader reach a family only through this record, so a new family adds files and edits none of them.

A family's models share one small contract with those callers:
- `models[name](**kwargs)` builds the network; `models[name].resolve(**kwargs)` returns every constructor argument
  it would build with (raising ValueError as building would) without making weights;
- the network has `in_channels`, `input_size` and `num_classes` attributes, and
  `forward(x (N, C, H, W), t (N,), y (N,)) -> (output (N, C', H, W), zs)`, where zs are the REPA projections.
  A text family's network (conditioning "text", MMDiT) is called `forward(x, t, context=(N, L, D))` instead, has
  no class table, and its objective's loss takes the context as `y` plus `null_context` (L, D), the empty
  caption's context that classifier-free dropout substitutes (trainer/data/context.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch

from manifests import SD_VAE_SCALE, SD_VAE_SHIFT

StateDict = dict[str, torch.Tensor]
CONDITIONINGS = ("class", "text")
# The latent space the families here work in (Rombach et al.'s SD-VAE): what a config that names none means.
DEFAULT_VAE = "sd-vae-ft-ema"  # REPA generate.py --vae ema, used for the paper's numbers
LATENT_DOWNSAMPLE = 8  # a 256 px image is a 32x32 latent


class ModelEntry(Protocol):
    """One size of a family, under its paper name (e.g. `SiT_models["SiT-XL/2"]`)."""

    def __call__(self, **kwargs: Any) -> torch.nn.Module: ...

    def resolve(self, **kwargs: Any) -> dict[str, Any]: ...


class Sampler(Protocol):
    """A sampler entry point: initial noise (N, C, H, W) and conditioning y -> latents (N, C, H, W) float64.

    Every entry takes the same keywords; one that has no use for a setting (e.g. `heun` for an SDE) ignores it.
    """

    def __call__(self, model: Callable, noise: torch.Tensor, y: torch.Tensor, *, steps: int,
                 generator: Any = None, heun: bool = False, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                 guidance_high: float = 1.0, path: str = "linear", null_class: int | None = None,
                 guide_channels: str = "all") -> torch.Tensor: ...


@dataclass(kw_only=True)
class ModelSpec:
    """What the caller states about the model (the --model ... flags); None: the checkpoint's record, else the
    family's official default. Our checkpoints carry config.json, which a contradicting flag may not override."""
    model: str | None = None
    encoder_depth: int | None = None
    projector_embed_dims: list[int] | None = None
    resolution: int | None = None
    num_classes: int | None = None
    path: str | None = None
    weights: str = "ema"  # "model": a training checkpoint's raw weights instead of its EMA


@dataclass(frozen=True, kw_only=True)
class Objective:
    """The training objective: its loss and how it noises clean latents (the alignment analysis uses that)."""
    name: str
    paths: tuple[str, ...]  # the --path values it supports; the first is the default
    # loss(net, x, y, zs, *, path, proj_coeff, proj_loss, ntxent_tau, amp, t, eps, drop) -> .total/.denoise/.proj
    loss: Callable[..., Any]
    # noisy(x0 (N, C, H, W), t (float or (N,)), eps like x0, path) -> x_t, the model's input at time t
    noisy: Callable[[torch.Tensor, Any, torch.Tensor, str], torch.Tensor]
    # model_time(t (N,) in [0, 1], 1 = noise) -> the time argument the network takes for x_t = noisy(x0, t, ...):
    # t itself for SiT, the integer DDPM timestep for DiT (the alignment analysis calls model(x_t, model_time(t), y))
    model_time: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)


@dataclass(frozen=True, kw_only=True)
class Released:
    """How the family's released (official) checkpoints are recognised and built, with their defaults."""
    model: str  # the size an unnamed file is tried as first (e.g. SiT-XL/2)
    recognises: Callable[[StateDict], bool]  # does a bare state dict belong to this family?
    # config(weights, spec, args) -> our config.json layout for a file without one: flags, then the file's own
    # argparse options (`args`), then shapes, then the defaults; "model" is None when nothing names the size.
    config: Callable[[StateDict, ModelSpec, dict[str, Any]], dict[str, Any]]
    # Released files known by name (`--ckpt NAME`, found in the usual caches, or `--ckpt NAME=PATH`):
    # name -> {"model": size, "resolution": px, "url": where the authors publish it}.
    files: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Family:
    name: str  # e.g. "SiT"
    models: Mapping[str, ModelEntry]  # sizes under the papers' names
    conditioning: str  # "class" (a label per image, null class for CFG) or "text" (a caption context)
    objective: Objective
    samplers: Mapping[str, Sampler]  # --mode -> entry point; the first is the default (training grids use it)
    released: Released
    steps: Mapping[str, int] = field(default_factory=dict)  # --mode -> its default --num-steps
    # The --cfg-channels rules its samplers take: "all" (u + s(c - u) on every channel) and, for DiT, "3" (the
    # released DiT sampler guides only the first three latent channels).
    cfg_channels: tuple[str, ...] = ("all",)
    hint: Callable[[str], str] = field(default=lambda key: "check --model")  # state-dict key -> flag to check
    prepare_sampling: Callable[[torch.nn.Module], None] = field(default=lambda model: None)  # drop training-only parts

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"family {self.name}: conditioning {self.conditioning!r} not in {CONDITIONINGS}")
        if not self.models or not self.samplers:
            raise ValueError(f"family {self.name} declares no models or no samplers")
        if self.released.model not in self.models:
            raise ValueError(f"family {self.name}: released default {self.released.model!r} is not one of its models")
        if set(self.steps) - set(self.samplers):
            raise ValueError(f"family {self.name}: default steps for unknown modes {sorted(set(self.steps) - set(self.samplers))}")

    @property
    def default_sampler(self) -> str:
        return next(iter(self.samplers))


# ---- helpers for the families' `Released.config` -----------------------------------------------------------------

def first_of(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def arg_int(args: dict[str, Any], key: str) -> int | None:
    with contextlib.suppress(TypeError, ValueError):
        return int(args[key]) if args.get(key) is not None else None
    return None


def released_record(spec: ModelSpec, args: dict[str, Any], kwargs: dict[str, Any], resolution: int, path: str,
                    vae: str) -> dict[str, Any]:
    """Our config.json layout for a released file: the size named by a flag or the file's `args` (None when
    nothing names it), its resolved kwargs, and the SD-VAE latent constants every family here uses."""
    return {"model": first_of(spec.model, args.get("model")), "model_kwargs": kwargs, "path": path, "vae": vae,
            "latent_scale": SD_VAE_SCALE, "latent_shift": SD_VAE_SHIFT, "resolution": resolution, "classes": []}

