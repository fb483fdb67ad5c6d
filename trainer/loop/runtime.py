"""Training setup: distributed init, input checks, model/EMA/optimiser, resume or --init-from, the loader.

`setup()` leaves `cfg` as the user asked and returns what it resolved (`Resolved`: the local run folder, the loader
kind, the micro-batch); RUN/config.json records both, the request under "train" and the choices under "resolved".
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist

from common import UserError, check
from manifests import load_manifest, storage
from manifests.io import atomic_write_bytes, atomic_write_json, ensure_writable_dir
from manifests.runs import CONFIG_NAME, STATS_NAME

from trainer.data import open_loader, plan_loader
from trainer.data.context import check_width, context_record, load_empty
from trainer.data.indexed import DataSpec, resolve_fields
from trainer.loop import checkpoint, remote_run
from trainer.loop.config import TrainConfig
from trainer.loop.microbatch import probe_batch, probe_micro
from trainer.loop.plot import read_stats
from trainer.loop.steprng import StepRandom
from trainer.models import Family, build_model as build_entry, family_for, load_weights_into, resolve_kwargs

# Keys of config.json that must match to resume a run (the rest, e.g. steps or workers, may change).
RESUME_KEYS = ("model", "path", "encoders", "model_kwargs")  # most telling first
RESUME_TRAIN_KEYS = ("batch_size", "seed", "proj_loss", "proj_coeff", "hflip", "precision")


@dataclass(frozen=True)
class Resolved:
    """What setup() chose from the request; config.json's "resolved" block (cfg keeps what was asked)."""
    run_dir: str  # where the run lives on this machine: --run-dir, or the local mirror of an s3:// --run-dir
    run_url: str | None  # --run-dir on an object store (each checkpoint is pushed there), else None
    loader: str  # indexed | ranged | stream (trainer/data/__init__.py)
    micro_batch: int  # images per pass on each rank: --micro-batch N, or what "auto" probed
    local_batch: int  # images per step on each rank (--batch-size / ranks)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Run:
    """Everything the loop needs."""
    cfg: TrainConfig  # as the user asked
    resolved: Resolved
    run_cfg: dict[str, Any]  # RUN/config.json
    family: Family
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    ema: torch.nn.Module
    net: torch.nn.Module  # DDP and/or compiled wrapper of `model`
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Callable[[], ContextManager]
    loader: Any
    start_step: int
    rand: StepRandom  # the per-sample randomness of each global batch (trainer/loop/steprng.py)
    encoders: list[str]  # the encoder fields the projectors align with, in order
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    resume_state: dict[str, Any] = field(default_factory=dict)
    monitor: Any = None  # trainer.monitor.Monitor, set by train()
    # Text families: the caption-context field, and the objective's extra keywords (the empty caption's context
    # for classifier-free dropout); class families: None and {} (their loss call is unchanged).
    context: str | None = None
    cond_kw: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.resolved.run_dir)

    @property
    def run_url(self) -> str | None:
        return self.resolved.run_url

    @property
    def stats_path(self) -> Path:
        return self.run_dir / STATS_NAME

    @property
    def micro(self) -> int:
        return self.resolved.micro_batch

    @property
    def local_batch(self) -> int:
        return self.resolved.local_batch

    @property
    def n_micro(self) -> int:
        return self.local_batch // self.micro

    def no_sync(self, skip: bool) -> ContextManager:
        """Skip the DDP all-reduce on all but the last micro-batch of a step."""
        if skip and isinstance(self.net_ddp, torch.nn.parallel.DistributedDataParallel):
            return self.net_ddp.no_sync()
        return contextlib.nullcontext()

    @property
    def net_ddp(self) -> torch.nn.Module:
        return getattr(self.net, "_orig_mod", self.net)

    def optimizer_step(self, bad: torch.Tensor) -> None:
        """The update, skipped when `bad` (non-finite gradients) is set; decided on the device where possible.

        GradScaler and fused AdamW skip through `found_inf` without a host sync. Without a scaler (bf16, fp32) a
        fused optimiser is handed the flag the way GradScaler hands it; a CPU optimiser just reads it.
        """
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)  # skips the update itself when it found inf/NaN
            self.scaler.update()
        elif getattr(self.opt, "_step_supports_amp_scaling", False):  # fused: GradScaler's contract
            self.opt.grad_scale, self.opt.found_inf = None, bad.float().reshape(1)
            self.opt.step()
        elif not bool(bad):
            self.opt.step()

    def loss_scale(self) -> torch.Tensor:
        """The current loss scale as a device tensor (reading it costs no sync); 1 without a scaler."""
        s = getattr(self.scaler, "_scale", None) if self.scaler.is_enabled() else None
        return s.detach().clone().reshape(()) if s is not None else torch.ones((), device=self.device)

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay*ema + (1-decay)*model on every step (REPA update_ema)."""
        e = [p for p in self.ema.parameters() if p.dtype.is_floating_point]
        m = [p for p in self.model.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(e, m, 1.0 - self.cfg.ema_decay)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def model_kwargs(cfg: TrainConfig, spec: DataSpec) -> dict[str, Any]:
    if spec.context is not None:  # text: no class table; the context embedder takes the manifest's text width
        kw = {"input_size": spec.input_size, "in_channels": spec.in_channels, "encoder_depth": cfg.enc_depth,
              "z_dims": spec.z_dims, "projector_dim": cfg.projector_dim, "context_dim": spec.context.dim}
        return {k: v for k, v in kw.items() if v is not None}
    kw = {"input_size": spec.input_size, "in_channels": spec.in_channels, "num_classes": spec.num_classes,
          "encoder_depth": cfg.enc_depth, "z_dims": spec.z_dims, "projector_dim": cfg.projector_dim,
          "class_dropout_prob": cfg.class_dropout_prob}
    return {k: v for k, v in kw.items() if v is not None}  # None: the registry entry's default


def build_model(cfg: TrainConfig, kwargs: dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    try:  # on an accelerator straight into its memory: no host copy of an XL model
        return build_entry(cfg.model, device, **kwargs)
    except ValueError as e:  # e.g. --enc-depth beyond the model depth
        raise UserError(f"--model {cfg.model}: {e}") from e


def run_config(cfg: TrainConfig, spec: DataSpec, manifest_path: Path) -> dict[str, Any]:
    """config.json: what sampling and resuming need (interfaces.md), with the full train config."""
    return {"model": cfg.model, "model_kwargs": model_kwargs(cfg, spec), "path": cfg.path,
            "encoders": spec.encoders, "vae": spec.vae, "latent_scale": spec.scale, "latent_shift": spec.shift,
            "resolution": spec.resolution, "classes": spec.classes, "manifest": str(manifest_path.resolve()),
            "train": cfg.to_json()}


def check_compatible(saved: dict[str, Any], now: dict[str, Any], run_dir: Path) -> None:
    diffs = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    diffs += [f"train.{k}" for k in RESUME_TRAIN_KEYS if saved.get("train", {}).get(k) != now["train"].get(k)]
    if diffs:
        k = diffs[0]
        get = (lambda d: d.get("train", {}).get(k[6:])) if k.startswith("train.") else (lambda d: d.get(k))
        raise UserError(f"run folder {run_dir} holds a run with a different '{k}' ({get(saved)!r}, now "
                        f"{get(now)!r}); re-run with its settings or use a new --run-dir")


def load_init(model: torch.nn.Module, path: str, cfg: TrainConfig) -> None:
    """--init-from: weights from our checkpoint/export or a released file (the one loader), checked shape by shape."""
    check(storage.path(path).is_remote or Path(path).exists(), f"--init-from: file not found: {path}")
    load_weights_into(model, path, name=cfg.model, what=f"{cfg.model} (--init-from)", encoder_depth=cfg.enc_depth)


def trim_stats(path: Path, upto: int | None) -> None:
    """On resume keep only stats rows up to the checkpoint step (later ones belong to the lost run)."""
    if not path.exists():
        return
    rows = [] if upto is None else [r for r in read_stats(path) if r.get("step", 0) <= upto]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def setup(cfg: TrainConfig, dry_run: bool = False) -> Run | None:
    """Validate every input before step 0, then build (or resume) the run; `cfg` is left as asked."""
    m = load_manifest(cfg.manifest, kind="features")
    family = family_for(cfg.model)
    spec = resolve_fields(m, cfg.encoders, int(resolve_kwargs(cfg.model)["patch_size"]), cfg.hflip,
                          family.conditioning, cfg.model)
    run_cfg = run_config(cfg, spec, m.path)
    if spec.context is not None:  # what sampling needs to know of the text side (encoder, tokenizer, empty file)
        run_cfg["context"] = context_record(m, spec.context)
    try:  # the geometry check (enc depth vs depth) and the registry's defaults, before any weight exists
        full = resolve_kwargs(cfg.model, **run_cfg["model_kwargs"])
    except ValueError as e:
        width = entry_width(cfg.model, run_cfg["model_kwargs"]) if spec.context is not None else None
        if width is not None:  # an entry that pins its text width (MMDiT/2: 768) names the manifest's
            check_width(m, spec.context, cfg.model, width)
        raise UserError(f"--model {cfg.model}: {e}") from e
    run_cfg["model_kwargs"].update(encoder_depth=full["encoder_depth"], projector_dim=full["projector_dim"])
    if dry_run:
        print(json.dumps(run_cfg, indent=2))
        return None
    rank, world, device = init_distributed()
    if device.type == "cpu" and cfg.precision == "fp16" and rank == 0:
        print("note: no GPU; fp16 autocast on CPU is slow (--precision fp32 or bf16 is faster there)", flush=True)
    check(cfg.batch_size % world == 0, f"--batch-size {cfg.batch_size} is not divisible by {world} ranks")
    local_batch = cfg.batch_size // world
    asked = None if cfg.micro_batch == "auto" else (int(cfg.micro_batch) or local_batch)  # 0: the whole batch
    check(asked is None or (asked <= local_batch and local_batch % asked == 0),
          f"--micro-batch {cfg.micro_batch} must divide the per-rank batch {local_batch}")
    run_url = cfg.run_dir if storage.path(cfg.run_dir).is_remote else None
    lease = remote_run.hold(cfg.run_dir, run_url) if rank == 0 else None  # one job per run folder
    # An s3:// run trains in a local mirror and pushes each checkpoint; every rank pulls (each node resumes).
    run_dir = ensure_writable_dir(remote_run.pull(run_url, lease) if run_url else cfg.run_dir,
                                  "run folder (--run-dir)")
    if cfg.verify:
        from manifests import verify_shards
        verify_shards(m, progress=rank == 0)
    plan = plan_loader(m, spec, stream=cfg.stream, hflip=cfg.hflip, index_cache=run_dir / "index")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, run_cfg["model_kwargs"], device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            eps=cfg.adam_eps, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.loss_scale_init, enabled=cfg.precision == "fp16")
    start, resume_state = 0, {}
    found = checkpoint.find_resume(run_dir, cfg.resume_from)
    if found is not None:
        ck, path = found
        check_compatible(ck["config"], run_cfg, run_dir)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        scaler.load_state_dict(ck["scaler"])
        start = int(ck["step"])
        resume_state = {"skipped": int(ck.get("skipped", 0)), "last_ckpt": str(path)}
        rngs = ck["rng"]
        if rank < len(rngs):
            checkpoint.set_rng_state(rngs[rank], device)
        else:  # more ranks than before: fresh streams for the new ones
            torch.manual_seed(cfg.seed + 1_000_003 * (rank + 1) + start)
        if rank == 0:
            print(f"resuming from {path} (step {start})", flush=True)
            trim_stats(run_dir / STATS_NAME, start)
            if cfg.resume_from is not None:
                checkpoint.abandon_newer(run_dir, start)
    else:
        if cfg.init_from:
            load_init(model, cfg.init_from, cfg)
            ema.load_state_dict(model.state_dict())
        torch.manual_seed(cfg.seed + 1_000_003 * (rank + 1))  # the step's draws come from trainer/loop/steprng.py
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
    amp = ((lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None
           else contextlib.nullcontext)
    cond_kw = {}
    if spec.context is not None:  # the empty caption's context, on the device once: the objective's dropout target
        cond_kw["null_context"] = torch.from_numpy(load_empty(m, spec.context)).to(device)  # (L, D)
    micro = asked if asked is not None else auto_micro(cfg, spec, family, model, ema, opt, amp, local_batch, world,
                                                       rank, device, cond_kw)
    resolved = Resolved(run_dir=str(run_dir), run_url=run_url, loader=plan.kind, micro_batch=micro,
                        local_batch=local_batch)
    run_cfg["resolved"] = resolved.to_json()
    if found is None and rank == 0:
        trim_stats(run_dir / STATS_NAME, None)
        atomic_write_json(run_dir / CONFIG_NAME, run_cfg)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    compiled = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if compiled:
        net = torch.compile(net)
    if rank == 0:
        print(f"per-rank batch {local_batch} in {local_batch // micro} micro-batch(es) of {micro}; "
              f"torch.compile {'on' if compiled else 'off'} ({device.type}); {plan.kind} reads", flush=True)
    rand = StepRandom(cfg.seed, cfg.batch_size, (spec.in_channels, spec.input_size, spec.input_size),
                      cfg.class_dropout_prob, device)
    loader = open_loader(plan, m, spec, seed=cfg.seed, hflip=cfg.hflip, rank=rank, world=world,
                         batch=cfg.batch_size, micro=micro, start_step=start, steps=cfg.steps,
                         num_workers=cfg.num_workers, pin=device.type == "cuda", cache_dir=cfg.cache_dir,
                         cache_gb=cfg.cache_gb)
    if world > 1:
        dist.barrier()
    return Run(cfg=cfg, resolved=resolved, run_cfg=run_cfg, family=family, rank=rank, world=world, device=device,
               model=model, ema=ema, net=net, opt=opt, scaler=scaler, amp=amp, loader=loader, start_step=start,
               rand=rand, encoders=list(spec.encoders), latent_scale=spec.scale, latent_shift=spec.shift,
               resume_state=resume_state, context=spec.context.name if spec.context else None, cond_kw=cond_kw)


def entry_width(model: str, kwargs: dict[str, Any]) -> int | None:
    """The text width a registry entry builds with when the manifest's is not imposed (None if it fails anyway)."""
    try:
        return int(resolve_kwargs(model, **{k: v for k, v in kwargs.items() if k != "context_dim"})["context_dim"])
    except (ValueError, KeyError):
        return None


def auto_micro(cfg: TrainConfig, spec: DataSpec, family: Family, model: torch.nn.Module, ema: torch.nn.Module,
               opt: torch.optim.Optimizer, amp, local_batch: int, world: int, rank: int, device: torch.device,
               cond_kw: dict[str, Any]) -> int:
    """--micro-batch auto: probe this rank, then agree on the smallest choice across ranks."""
    loss_kw = dict(path=cfg.path, proj_coeff=cfg.proj_coeff, proj_loss=cfg.proj_loss, ntxent_tau=cfg.ntxent_tau,
                   **cond_kw)
    probe = probe_micro(model, ema, opt, local_batch, probe_batch(spec, device, cfg.class_dropout_prob > 0),
                        family.objective.loss, loss_kw, amp, device, extra=(sum(p.numel() * p.element_size() for p in model.parameters())
                                                     if world > 1 else 0))  # DDP's gradient buckets
    micro = probe.micro
    if world > 1:
        t = torch.full((1,), micro, device=device, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        micro = int(t.item())
        while local_batch % micro:  # a smaller rank's choice divides the same per-rank batch: kept for safety
            micro -= 1
    if rank == 0:
        print(probe.describe(local_batch) + (f"; {micro} on every rank" if micro != probe.micro else ""), flush=True)
    return micro
