"""Typed training config, the paper's presets (Table 7) and the `train` command line."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from common import check
from common.cli import ArgumentParser, PlainHelpFormatter, flag, nonneg_int, positive_float, positive_int
from common.config_file import add_config_flag, layered

from trainer.repa_flags import TRAIN_ALIASES, add_train_aliases, finish_aliases

from trainer.models import family_for, model_names, objective_paths
from trainer.objectives.interpolant import PROJ_LOSSES

PRECISIONS = ("fp16", "bf16", "fp32")
REPORT_TO = ("tensorboard", "wandb", "none")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that defines a run; saved as RUN/config.json and inside every checkpoint."""
    manifest: str = ""
    run_dir: str = ""
    preset: str | None = None
    # model
    model: str = "SiT-XL/2"
    encoders: list[str] | None = None  # None: every encoder field of the manifest; [] for plain SiT/DiT
    enc_depth: int | None = None  # None: the registry's default (8; 2 for SiT-Debug/2 and DiT-Debug/2)
    projector_dim: int | None = None  # None: the registry's default (2048; 256 for the Debug/2 sizes)
    class_dropout_prob: float = 0.1  # REPA --cfg-prob
    # objective
    proj_coeff: float = 0.5
    proj_loss: str = "cos"
    ntxent_tau: float = 0.1
    path: str = "linear"  # the family's objective path: SiT's interpolant, DiT's beta schedule (both default linear)
    # optimisation (REPA train.py defaults)
    batch_size: int = 256  # global, split across ranks
    micro_batch: int | str = "auto"  # per-rank images per pass; "auto": the largest that fits (trainer/loop/microbatch.py)
    steps: int = 400_000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: str = "fp16"
    loss_scale_init: float = 2.0 ** 16  # torch GradScaler default
    compile: bool | None = None  # torch.compile the model; None: on for CUDA, off for CPU
    # data
    seed: int = 0
    num_workers: int = 4
    hflip: bool = False
    verify: bool = False
    cache_dir: str | None = None  # object-store manifests: local folder that keeps whole shards once read
    cache_gb: float = 100.0  # bound of --cache-dir
    stream: bool = False  # sequential webdataset reads; resume at shard + sample offset (trainer/data/stream.py)
    # run
    ckpt_every: int = 50_000
    log_every: int = 100
    max_nonfinite: int = 100  # consecutive non-finite losses that stop the run
    init_from: str | None = None
    trace_data: bool = False  # write RUN/trace/rank{r}.jsonl with the sample keys of each step
    # watching the run (common/tracking.py, trainer/loop/preview.py) and checkpoint retention (trainer/loop/checkpoint.py)
    report_to: str = "tensorboard"
    sample_every: int = 10_000  # 0: no sample grids
    sample_steps: int = 32  # steps of a grid's sampler, the family's default one (the reported numbers use 250)
    sample_grid: int = 16  # images in a grid
    keep_last: int = 3
    keep_every: int = 100_000  # 0: no milestones
    resume_from: str | None = None  # PATH or STEP; None: the newest checkpoint of the run

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# Paper Table 7 ("Table 3" columns): SiT-B/2 at depth 4, SiT-L/2 with NT-Xent + DINOv2-L, SiT-XL/2 at depth 8.
PRESETS: dict[str, dict[str, Any]] = {
    "sit-b2-repa": dict(model="SiT-B/2", enc_depth=4, proj_loss="cos", encoders=["dinov2-vit-b"], steps=400_000,
                        batch_size=256, proj_coeff=0.5),
    "sit-l2-repa": dict(model="SiT-L/2", enc_depth=8, proj_loss="ntxent", encoders=["dinov2-vit-l"],
                        steps=700_000, batch_size=256, proj_coeff=0.5),
    "sit-xl2-repa": dict(model="SiT-XL/2", enc_depth=8, proj_loss="cos", encoders=["dinov2-vit-b"],
                         steps=4_000_000, batch_size=256, proj_coeff=0.5),
    # Paper Appendix J / Table 11 (ImageNet 512x512): the 256 px recipe on a 512 px manifest (64x64 latents,
    # DINOv2 at 448 px); 200 epochs = 1M steps at batch 256 (FID 2.08 with CFG w=1.35).
    "sit-xl2-repa-512": dict(model="SiT-XL/2", enc_depth=8, proj_loss="cos", encoders=["dinov2-vit-b"],
                             steps=1_000_000, batch_size=256, proj_coeff=0.5),
}
# Paper Table 3, DiT rows (DDPM objective, no CFG at evaluation): DiT's own recipe (AdamW 1e-4, batch 256, 400K
# iterations) with REPA as the paper applies it everywhere outside Table 7's SiT-L/2 column: DINOv2-B, cos. sim.,
# lambda 0.5, alignment after block 8 (Section 4.1: "we apply REPA to the first 8 layers"). The plain rows are the
# same with `encoders=[]` (`--encoders none`). FIDs: DiT-L/2 23.3 -> 15.6, DiT-XL/2 19.5 -> 12.3 (400K);
# DiT-XL/2 + REPA at 850K (`--train-steps 850000`) equals vanilla DiT-XL/2 at 7M: 9.6.
PRESETS.update({
    "dit-l2": dict(model="DiT-L/2", encoders=[], steps=400_000, batch_size=256, lr=1e-4),
    "dit-l2-repa": dict(model="DiT-L/2", enc_depth=8, proj_loss="cos", encoders=["dinov2-vit-b"], steps=400_000,
                        batch_size=256, lr=1e-4, proj_coeff=0.5),
    "dit-xl2": dict(model="DiT-XL/2", encoders=[], steps=400_000, batch_size=256, lr=1e-4),
    "dit-xl2-repa": dict(model="DiT-XL/2", enc_depth=8, proj_loss="cos", encoders=["dinov2-vit-b"], steps=400_000,
                         batch_size=256, lr=1e-4, proj_coeff=0.5),
})
# Paper Appendix K / Table 12 (MS-COCO text-to-image, U-ViT's protocol): MMDiT/2 (depth 24, hidden 768) for 150K
# iterations at batch 256; REPA as train_t2i.py's README runs it (DINOv2-B, lambda 0.5, encoder depth 8; lr 1e-4,
# --cfg-prob 0.1: the caption context dropped to the empty one). FIDs (CFG 2.0): ODE-50 6.05 -> 4.73, SDE-250
# 5.30 -> 4.14. The plain row is the same with `encoders=[]`.
PRESETS.update({
    "mmdit-repa-coco": dict(model="MMDiT/2", enc_depth=8, proj_loss="cos", encoders=["dinov2-vit-b"],
                            steps=150_000, batch_size=256, lr=1e-4, proj_coeff=0.5, class_dropout_prob=0.1),
    "mmdit-coco": dict(model="MMDiT/2", encoders=[], steps=150_000, batch_size=256, lr=1e-4,
                       class_dropout_prob=0.1),
})
PRESET_RESOLUTION = {"sit-xl2-repa-512": 512}  # presets that only make sense on a manifest of this resolution


def _encoders(text: str) -> list[str]:
    """Comma list of encoder names (lower-cased: REPA spells 'clip-vit-L'); 'none' for plain SiT or DiT."""
    if text.strip().lower() in ("", "none"):
        return []
    return [e.strip().lower() for e in text.split(",") if e.strip()]


def _micro_batch(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    return nonneg_int(text)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    # conflict_handler="resolve": a flag added after the REPA aliases replaces the alias of the same name.
    p = ArgumentParser(prog="python -m trainer train", formatter_class=PlainHelpFormatter,
                conflict_handler="resolve",
                description="Train SiT or DiT + REPA on precomputed VAE moments and encoder features (DESIGN §4, "
                            "§9); the model's family brings its objective (SiT: linear interpolant, DiT: DDPM).",
                epilog="example:\n  python -m trainer train --manifest feats/ --run-dir runs/xl --preset sit-xl2-repa\n"
                       "  torchrun --nproc-per-node 8 -m trainer train --manifest feats/ --run-dir runs/xl "
                       "--preset sit-xl2-repa\nRe-running the same command resumes from the last checkpoint.\n"
                       "Flags given explicitly override the preset; the preset overrides the defaults shown.")
    g = p.add_argument_group("input and output")
    g.add_argument("--manifest", help="features manifest.json (or its folder); required")
    g.add_argument("--run-dir", help="run folder: checkpoints/, export/, stats.jsonl, loss.png; required")
    g.add_argument("--preset", choices=sorted(PRESETS), help="paper setting (sit-*: Table 7; -512: Table 11; "
                   "dit-*: Table 3's DiT rows; mmdit-*: Table 12's text-to-image rows)")
    add_config_flag(g)
    g.add_argument("--init-from", help="start from weights: our checkpoint/export, or an official REPA .pt")
    g.add_argument("--dry-run", action="store_true", help="print the resolved settings as JSON and exit")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=model_names(), metavar="NAME", help=f"a registry name: SiT-{{S,B,L,XL}}/{{1,2,4,8}}, "
                   f"DiT-{{S,B,L,XL}}/{{2,4,8}}, MMDiT/2 (text-to-image), SiT-Debug/2, DiT-Debug/2, MMDiT-Debug/2 "
                   f"(default {d.model})")
    g.add_argument("--encoders", type=_encoders, help="comma list of encoder fields, or 'none' "
                   "(default: every encoder field of the manifest)")
    flag(g, "--encoder-depth", "--enc-depth", dest="enc_depth", metavar="N", type=positive_int,
         help="align after this block, 1-based (default 8)")
    flag(g, "--projector-hidden-dim", "--projector-dim", dest="projector_dim", metavar="N", type=positive_int,
         help="width of each projector MLP's hidden layers (default 2048); its output width is the encoder's")
    g.add_argument("--class-dropout-prob", type=float, help=f"label drop for CFG; text models: the caption "
                   f"context replaced by the empty caption's (default {d.class_dropout_prob})")
    g = p.add_argument_group("objective")
    g.add_argument("--proj-coeff", type=float, help=f"REPA weight lambda (default {d.proj_coeff})")
    g.add_argument("--proj-loss", choices=PROJ_LOSSES, help=f"(default {d.proj_loss})")
    g.add_argument("--ntxent-tau", type=positive_float, help=f"NT-Xent temperature (default {d.ntxent_tau})")
    g.add_argument("--path", choices=objective_paths(), help=f"the objective's path: SiT's interpolant (linear, "
                   f"cosine), DiT's beta schedule (linear) (default {d.path})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=positive_int, help=f"global batch (default {d.batch_size})")
    g.add_argument("--micro-batch", type=_micro_batch, help="per-GPU images per pass, or 'auto': the largest "
                   "divisor of the per-GPU batch whose forward+backward fits the memory budget (GPU memory, or "
                   "$REPA_MEMORY_BUDGET_GB if lower); smaller than the per-GPU batch means grad accumulation, same "
                   "optimiser step (default auto; 0 = the whole per-GPU batch)"),
    flag(g, "--train-steps", "--steps", dest="steps", metavar="N", type=positive_int,
         help=f"optimiser steps to train for (default {d.steps})")
    g.add_argument("--lr", type=positive_float, help=f"(default {d.lr})")
    g.add_argument("--adam-beta1", type=float, help=f"AdamW beta1 (default {d.betas[0]})")
    g.add_argument("--adam-beta2", type=float, help=f"AdamW beta2 (default {d.betas[1]})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--adam-eps", type=positive_float, help=f"AdamW epsilon (default {d.adam_eps})")
    g.add_argument("--grad-clip", type=positive_float, help=f"(default {d.grad_clip})")
    g.add_argument("--ema-decay", type=float, help=f"(default {d.ema_decay})")
    g.add_argument("--precision", choices=PRECISIONS, help=f"forward/backward numerics: fp16 autocast with loss "
                   f"scaling (REPA's), bf16 autocast, or fp32 (default {d.precision}; docs/cli.md)")
    g.add_argument("--loss-scale-init", type=positive_float, help=f"fp16 GradScaler init (default {d.loss_scale_init:g})")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off for CPU)")
    g = p.add_argument_group("data")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g.add_argument("--num-workers", type=nonneg_int, help=f"data loader worker processes per rank "
                   f"(default {d.num_workers})")
    flag(g, "--use-hflip", "--hflip", dest="hflip", action="store_true", default=None,
         help="train on the flipped twins with p=0.5 (stored by `pipeline extract --store-hflip`)")
    g.add_argument("--verify", action="store_true", default=None, help="check shard sha256 before step 0")
    g.add_argument("--cache-dir", help="with an s3:// or gs:// --manifest: keep each shard read once in this local "
                   "folder (checked against the manifest's sha256), reads then come from local disk")
    g.add_argument("--cache-gb", type=positive_float, help=f"size bound of --cache-dir in GiB, oldest-used shards "
                   f"evicted first (default {d.cache_gb:g})")
    g.add_argument("--stream", action="store_true", default=None,
                   help="read shards sequentially with webdataset instead of indexed reads: no global shuffle "
                        "(seeded shard order per rank), resume at shard level plus a sample offset")
    g = p.add_argument_group("run")
    g.add_argument("--ckpt-every", type=positive_int, help=f"(default {d.ckpt_every})")
    g.add_argument("--log-every", type=positive_int, help=f"stats.jsonl interval (default {d.log_every})")
    g.add_argument("--max-nonfinite", type=positive_int, help=f"consecutive non-finite losses that stop "
                   f"the run (default {d.max_nonfinite})")
    g.add_argument("--trace-data", action="store_true", default=None, help="log each step's sample keys per rank")
    g = p.add_argument_group("watching the run (RUN/log.txt, RUN/tb/, RUN/samples/, loss.png)")
    g.add_argument("--report-to", choices=REPORT_TO, help=f"tracker for every stats.jsonl scalar and the sample "
                   f"grids; tensorboard writes RUN/tb/ (default {d.report_to})")
    g.add_argument("--sample-every", type=nonneg_int, help=f"EMA sample grid to RUN/samples/step-NNNNNNN.png every N "
                   f"steps, fixed classes and noise; 0 = never (default {d.sample_every})")
    flag(g, "--sample-num-steps", "--sample-steps", dest="sample_steps", metavar="N", type=positive_int,
         help=f"steps of a grid's sampler (the family's default: SiT SDE, DiT DDPM): `trainer sample --num-steps` "
              f"(default {d.sample_steps})")
    flag(g, "--sample-num-samples", "--sample-grid", dest="sample_grid", metavar="N", type=positive_int,
         help=f"images in a grid: `trainer sample --num-samples` (default {d.sample_grid})")
    g = p.add_argument_group("checkpoint retention and resume")
    g.add_argument("--keep-last", type=nonneg_int, help=f"keep the newest N checkpoints and EMA exports "
                   f"(default {d.keep_last}; the newest is always kept)")
    g.add_argument("--keep-every", type=nonneg_int, help=f"also keep every step that is a multiple of K forever; "
                   f"0 = none (default {d.keep_every})")
    g.add_argument("--resume-from", metavar="PATH|STEP", help="resume from this checkpoint (a file, or a step of "
                   "this run) instead of the newest; newer ones are moved to checkpoints/abandoned/")
    add_train_aliases(p)  # last: aliases take the dest/type of whatever flags exist by now
    return p


def resolve(argv: Sequence[str]) -> tuple[TrainConfig, bool]:
    """Parse argv; defaults < preset < --config file < explicit flags. Returns (config, dry_run)."""
    names = {f.name for f in fields(TrainConfig)}
    values = layered(build_parser(), argv, names, PRESETS, section="train")
    dry = bool(values.pop("dry_run", False))
    values = finish_aliases(values)
    values = {k: v for k, v in values.items() if v is not None}
    unknown = sorted(set(values) - names)
    check(not unknown, f"unknown train setting(s) {unknown}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    check(values.get("manifest"), "python -m trainer train: --manifest is required (or 'manifest' in --config)")
    check(values.get("run_dir"), "python -m trainer train: --run-dir is required (or 'run_dir' in --config; "
                                 "REPA: --output-dir + --exp-name)")
    cfg = TrainConfig(**values)
    validate(cfg)
    want = PRESET_RESOLUTION.get(cfg.preset or "")
    if want:  # a 512 px recipe on 256 px features would silently train the wrong model
        from manifests import load_manifest
        have = load_manifest(cfg.manifest).preprocess.get("resolution")
        check(have == want, f"--preset {cfg.preset} is a {want} px recipe, but manifest {cfg.manifest} is {have} px")
    return cfg, dry


def validate(cfg: TrainConfig) -> None:
    family = family_for(cfg.model)  # an unknown name is a user error listing the choices
    check(cfg.path in family.objective.paths, f"--path {cfg.path}: {family.name}'s objective "
          f"({family.objective.name}) takes {', '.join(family.objective.paths)}")
    check(cfg.batch_size > 0 and cfg.steps > 0 and cfg.ckpt_every > 0, "batch size, steps, ckpt-every must be > 0")
    check(cfg.micro_batch == "auto" or (isinstance(cfg.micro_batch, int) and cfg.micro_batch >= 0),
          f"--micro-batch must be 'auto' or an integer >= 0, got {cfg.micro_batch!r}")
    check(0 <= cfg.class_dropout_prob < 1, f"--class-dropout-prob must be in [0, 1), got {cfg.class_dropout_prob}")
    check(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    check(cfg.proj_coeff >= 0, f"--proj-coeff must be >= 0, got {cfg.proj_coeff}")


def from_json(d: dict[str, Any]) -> TrainConfig:
    """Inverse of TrainConfig.to_json (unknown keys ignored)."""
    names = {f.name for f in fields(TrainConfig)}
    d = {k: v for k, v in d.items() if k in names}
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    return TrainConfig(**d)


def dumps(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_json(), indent=2)


__all__ = ["TrainConfig", "PRESETS", "PRESET_RESOLUTION", "PRECISIONS", "TRAIN_ALIASES", "build_parser", "resolve",
           "validate", "from_json", "dumps"]
