"""`python -m trainer sample` settings: the typed config and its command line."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from common import UserError
from common.cli import ArgumentParser, HelpFormatter, flag, nonneg_int, positive_int
from common.device import DEVICE_HELP, device_flag
from common.config_file import add_config_flag, layered

from trainer.models import cfg_rules, objective_paths, sampler_modes
from trainer.repa_flags import add_sample_aliases

PRECISIONS = ("fp32", "tf32", "bf16")

# The paper's sampling settings (SDE, 250 steps, 50K samples). `resolution`: the checkpoint must be at it.
PRESETS: dict[str, dict[str, Any]] = {
    # Table 4 (*, guidance interval) / Table 10: FID 1.42 at 4M steps.
    "paper-cfg": dict(mode="sde", steps=250, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7),
    # Table 3 / Table 7: no guidance (FID 7.9 at 400K, 5.9 at 4M).
    "paper-nocfg": dict(mode="sde", steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0),
    # Table 4 without the interval: w = 1.35 on every step (FID 1.80 at 4M).
    "paper-cfg-1.35": dict(mode="sde", steps=250, cfg_scale=1.35, guidance_low=0.0, guidance_high=1.0),
    # Table 11 (ImageNet 512x512): w = 1.35, no interval (FID 2.08 at 200 epochs).
    "paper-512-cfg": dict(mode="sde", steps=250, cfg_scale=1.35, guidance_low=0.0, guidance_high=1.0,
                          expect_resolution=512),
    # DiT (DDPM), paper Table 3: 250 respaced DDPM steps, no guidance (the released DiT-XL/2: FID 9.6).
    "dit-nocfg": dict(mode="ddpm", steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0),
    # The DiT paper's best number (DiT-XL/2, FID 2.27): scale 1.5 on every step, guiding the first three latent
    # channels only, as the released sample_ddp.py's forward_with_cfg does.
    "dit-cfg-1.5": dict(mode="ddpm", steps=250, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0,
                        cfg_channels="3"),
    # Text-to-image, paper Table 12 (MMDiT on MS-COCO, 150K iterations): CFG 2.0 on every step; ODE with NFE 50
    # (FID 4.73 with REPA, 6.05 without) and SDE with NFE 250 (4.14 vs 5.30). Use with --captions val annotations.
    "t2i-ode": dict(mode="ode", steps=50, cfg_scale=2.0, guidance_low=0.0, guidance_high=1.0),
    "t2i-sde": dict(mode="sde", steps=250, cfg_scale=2.0, guidance_low=0.0, guidance_high=1.0),
}
REPA_VAES = {"ema": "sd-vae-ft-ema", "mse": "sd-vae-ft-mse"}  # REPA generate.py --vae ema|mse


@dataclass(kw_only=True)
class SampleConfig:
    """Everything that decides the images (batch size and world size do not)."""
    ckpt: str
    out: str
    preset: str | None = None
    expect_resolution: int | None = None  # set by 512 px presets: the checkpoint must be at this resolution
    num_samples: int | None = None  # None: 50,000 (class families), or one per prompt/caption (text)
    mode: str | None = None  # None: the family's default sampler (SiT: sde, DiT: ddpm), set when the model loads
    steps: int | None = None  # None: the mode's default (sde 250, ode 50, ddpm 250, ddim 50)
    heun: bool = False
    cfg_scale: float = 1.0
    cfg_channels: str = "all"  # CFG on every latent channel, or "3": DiT's released rule (its first three only)
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    guide_ckpt: str | None = None  # autoguidance: the weaker model that replaces the unconditional branch
    seed: int = 0
    balanced: bool = False
    # Text-to-image (MMDiT): where each sample's caption comes from, and the text encoder (None: the run's)
    prompts: str | None = None
    captions: str | None = None
    text_encoder: str | None = None
    batch_size: int = 64
    shard_size: int = 1000
    npz: bool = False
    vae: str | None = None  # None: the VAE named in the checkpoint config, else sd-vae-ft-ema
    precision: str = "tf32"
    device: str | None = None
    # Model flags for official checkpoints (ours carry config.json).
    model: str | None = None
    encoder_depth: int | None = None
    projector_embed_dims: str | None = None
    resolution: int | None = None
    num_classes: int | None = None
    path: str | None = None


def _device(text: str) -> str | None:
    """--device: None stands for auto (the job picks cuda:LOCAL_RANK or cpu)."""
    name = device_flag(text)
    return None if name == "auto" else name


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m trainer sample", formatter_class=HelpFormatter,
                description="Generate images from a SiT or DiT checkpoint into PNG shards and a samples manifest.",
                epilog="example (the paper's FID 1.42 setting):\n  torchrun --nproc-per-node 8 -m trainer sample "
                       "--ckpt RUN --out samples --num-samples 50000 --mode sde --num-steps 250 --cfg-scale 1.8 "
                       "--guidance-high 0.7 --npz\n  (the same: --ckpt RUN --out samples --preset paper-cfg --npz)\n"
                       "an official REPA file:\n  python -m trainer sample --out samples --ckpt SiT-XL-2-256.pt "
                       "--model SiT-XL/2 --encoder-depth 8 --projector-embed-dims 768\n"
                       "the released DiT-XL/2 (found in $TORCH_HOME/hub/checkpoints or ./pretrained_models):\n"
                       "  python -m trainer sample --out samples --ckpt DiT-XL-2-256x256.pt --preset dit-nocfg")
    io_ = p.add_argument_group("input/output")
    io_.add_argument("--ckpt", help="our .pt / export .safetensors / run folder / official REPA or DiT file / a "
                     "released name (DiT-XL-2-256x256.pt) or NAME=PATH; required")
    io_.add_argument("--out", help="output folder (shards/, manifest.json, grid.png); required")
    io_.add_argument("--preset", choices=sorted(PRESETS), help="the paper's sampling settings: paper-cfg (SDE 250, "
                     "CFG 1.8 on [0, 0.7]), paper-nocfg, paper-cfg-1.35, paper-512-cfg (Table 11); DiT: dit-nocfg "
                     "(DDPM 250, Table 3), dit-cfg-1.5 (the DiT paper's 2.27); MMDiT: t2i-ode, t2i-sde (Table 12)")
    add_config_flag(io_)
    io_.add_argument("--dry-run", action="store_true", help="print the resolved settings as JSON and exit")
    io_.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0, N×H×W×3 uint8) for ADM")
    io_.add_argument("--shard-size", type=positive_int, default=1000, help="samples per tar shard (the resume unit)")
    s = p.add_argument_group("sampling")
    s.add_argument("--num-samples", type=positive_int, default=None, help="images to generate (indices 0..N-1; "
                   "default 50000, or one per prompt / caption for text-to-image)")
    s.add_argument("--mode", choices=sampler_modes(), default=None, help="the model family's sampler: SiT sde "
                   "(Euler–Maruyama, the default) or ode (Euler/Heun); DiT ddpm (ancestral, the default) or ddim "
                   "(eta 0, deterministic)")
    flag(s, "--num-steps", "--steps", dest="steps", metavar="N", type=positive_int, default=None,
         help="sampler steps; default: 250 (sde, ddpm) or 50 (ode, ddim); DDPM/DDIM respace DiT's 1000 timesteps")
    s.add_argument("--heun", action="store_true", help="Heun instead of Euler (ode only)")
    s.add_argument("--cfg-scale", type=float, default=1.0, help="1 = no guidance; the paper uses 1.8")
    s.add_argument("--cfg-channels", choices=cfg_rules(), default="all", help="latent channels CFG guides: all "
                   "(the default), or 3, the released DiT sampler's rule (first three channels; reproduces the DiT "
                   "paper's FIDs; DiT only)")
    s.add_argument("--guidance-low", type=float, default=0.0, help="CFG applies only for low <= t <= high "
                   "(DiT: t = timestep/1000)")
    s.add_argument("--guidance-high", type=float, default=1.0, help="the paper uses 0.7")
    s.add_argument("--guide-ckpt", default=None, metavar="PATH_OR_RUN@STEP",
                   help="autoguidance (Karras et al. 2024): guide with this weaker model (a smaller one, or an "
                        "earlier step of the same run: RUN@STEP) instead of the unconditional branch, "
                        "D = D_guide + w (D_main - D_guide) with w = --cfg-scale, inside the guidance interval; "
                        "default: CFG (docs/sampling.md#autoguidance)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="sample i's label and noise come from (seed, i)")
    s.add_argument("--balanced", action="store_true", help="an equal number of samples per class")
    t = p.add_argument_group("text-to-image (MMDiT; docs/text-to-image.md)")
    t.add_argument("--prompts", metavar="FILE", default=None, help="one prompt per line; sample i uses prompt "
                   "i mod P (default --num-samples: one per prompt)")
    t.add_argument("--captions", metavar="ANNOTATIONS.json|MANIFEST", default=None,
                   help="COCO annotations (captions_val2014.json) or a text-to-image features manifest: one sample "
                        "per image in id order, its caption drawn uniformly by (seed, image), as generate_t2i.py")
    t.add_argument("--text-encoder", metavar="NAME[=PATH]", default=None,
                   help="caption encoder (default: the one the run was trained with, from RUN/config.json; "
                        "clip-vit-l-text for released files)")
    r = p.add_argument_group("runtime")
    r.add_argument("--batch-size", type=positive_int, default=64, help="global, split across ranks as in train; "
                   "does not change the images")
    r.add_argument("--precision", choices=PRECISIONS, default="tf32",
                   help="the model's matmuls; the state stays float64 (tf32 is the reference's setting; docs/cli.md)")
    r.add_argument("--device", type=_device, default=None, help=f"{DEVICE_HELP}; auto takes cuda:LOCAL_RANK "
                   "(default: auto)")
    r.add_argument("--vae", default=None, help="NAME[=PATH] (REPA's ema|mse work); default: the checkpoint's VAE, "
                   "else sd-vae-ft-ema")
    m = p.add_argument_group("model (official checkpoints; ours carry config.json)")
    m.add_argument("--model", default=None, help="e.g. SiT-XL/2 (default for official files), DiT-XL/2")
    m.add_argument("--encoder-depth", type=positive_int, default=None, help="default 8 for official files")
    m.add_argument("--projector-embed-dims", default=None, help="each projector's output width, i.e. its encoder's token width (comma list; default 768 for "
                   "official files); `trainer train --projector-hidden-dim` is the hidden width")
    m.add_argument("--resolution", type=positive_int, default=None, help="default 256 for official files")
    m.add_argument("--num-classes", type=positive_int, default=None, help="default 1000 for official files")
    m.add_argument("--path", choices=objective_paths(), default=None, help="the objective's path (SiT interpolant, "
                   "DiT beta schedule); default from the checkpoint")
    add_sample_aliases(p)
    return p


def parse(argv: Sequence[str]) -> SampleConfig:
    """defaults < --preset < --config file < flags."""
    cfg, _ = resolve(argv)
    return cfg


def resolve(argv: Sequence[str]) -> tuple[SampleConfig, bool]:
    names = {f.name for f in fields(SampleConfig)}
    values = layered(build_parser(), argv, names, PRESETS)
    dry = bool(values.pop("dry_run", False))
    for name in ("ckpt", "out"):
        if not values.get(name):
            raise UserError(f"python -m trainer sample: --{name} is required (or '{name}' in --config)")
    cfg = SampleConfig(**values)
    if cfg.vae in REPA_VAES:
        cfg.vae = REPA_VAES[cfg.vae]
    if cfg.heun and cfg.mode not in (None, "ode"):
        raise UserError("--heun applies to --mode ode only")
    if cfg.guide_ckpt is not None and cfg.cfg_scale == 1.0:
        raise UserError("--guide-ckpt needs --cfg-scale > 1 (w = 1 is the main model alone)")
    if cfg.cfg_scale < 1.0:
        raise UserError(f"--cfg-scale must be >= 1 (1 = no guidance), got {cfg.cfg_scale}")
    if not 0.0 <= cfg.guidance_low <= cfg.guidance_high <= 1.0:
        raise UserError(f"need 0 <= --guidance-low <= --guidance-high <= 1, got {cfg.guidance_low}, "
                        f"{cfg.guidance_high}")
    return cfg, dry


def settle_mode(cfg: SampleConfig, samplers: Sequence[str], steps: dict[str, int], rules: Sequence[str],
                family: str) -> None:
    """Fill --mode and --num-steps from the loaded model's family and check the sampler settings against it."""
    if cfg.mode is None:
        cfg.mode = samplers[0]
    if cfg.mode not in samplers:
        raise UserError(f"--mode {cfg.mode}: {family} samples with {', '.join(samplers)}")
    if cfg.steps is None:
        cfg.steps = steps[cfg.mode]
    if cfg.heun and cfg.mode != "ode":
        raise UserError(f"--heun applies to --mode ode only (this is {family}, --mode {cfg.mode})")
    if cfg.cfg_channels not in rules:
        raise UserError(f"--cfg-channels {cfg.cfg_channels}: {family} guides {' or '.join(rules)}")


def per_rank_batch(cfg: SampleConfig, world: int) -> int:
    """--batch-size is global (as in train): each rank's share, at least 1."""
    return max(1, -(-cfg.batch_size // max(1, world)))


def check_resolution(cfg: SampleConfig, resolution: int) -> None:
    """A 512 px preset on a 256 px checkpoint is a mistake, not a setting."""
    if cfg.expect_resolution and resolution != cfg.expect_resolution:
        raise UserError(f"--preset {cfg.preset} is a {cfg.expect_resolution} px setting, but the checkpoint "
                        f"is {resolution} px ({cfg.ckpt})")


def dumps(cfg: SampleConfig) -> str:
    return json.dumps(asdict(cfg), indent=2)
