"""`python -m trainer sample`: checkpoint -> SDE/ODE samples -> VAE decode -> PNG shards + samples manifest.

Sample i's label and noise come from a generator seeded by (seed, i), so the images do not depend on the
batch size or the number of ranks. The index range is cut into shards; torchrun ranks take shards
round-robin; a finished shard (tar + sidecar) is kept on a re-run, so after kills every index exists once.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from manifests import (SD_VAE_SCALE, SD_VAE_SHIFT, Manifest, ShardEntry, atomic_write_json, read_json, sha256_file,
                       write_manifest, write_shard)
from common import UserError
from manifests import storage
from manifests.io import ensure_writable_dir, remove_tmp_files

from trainer.models.checkpoints import check_state_dict, load_sit_weights
from trainer.sampling.output import decode, png_bytes, write_grid, write_npz
# `parse` is re-exported for callers of trainer.sample.
from trainer.sampling.config import SampleConfig, check_resolution, dumps, parse, per_rank_batch, resolve  # noqa: F401
from trainer.sampling.samplers import nfe, sample_ode, sample_sde

SHARD_NAME = "samples-{:06d}"
SIDECAR_VERSION = 1
# Test hook (fault injection): "K:SECONDS" sleeps after shard K's tar is in place and before its sidecar,
# so a test can SIGKILL the job at the worst moment (the shard must then be redone, not trusted).
PAUSE_ENV = "REPA_TEST_SAMPLE_PAUSE"


# ---- model ----------------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    model: torch.nn.Module
    meta: dict[str, Any]
    info: dict[str, Any]  # model name, path, vae, latent scale/shift, resolution, classes
    velocity: Any = None  # the prepared (cast, compiled) forward, made once per process in run()


def load_model(cfg: SampleConfig) -> Loaded:
    """Build the SiT the checkpoint describes (or the flags, for official files) and load it strictly."""
    from trainer.models.sit import SiT_models
    sd, meta = load_sit_weights(cfg.ckpt, encoder_depth=cfg.encoder_depth)
    conf, args = meta.get("config"), meta.get("args") or {}
    if conf is not None:  # ours: config.json decides; contradicting flags are a mistake
        name, kwargs = conf["model"], dict(conf["model_kwargs"])
        dims = ",".join(str(d) for d in kwargs.get("z_dims", []))
        for flag, have in (("model", name), ("encoder_depth", kwargs.get("encoder_depth")),
                           ("num_classes", kwargs.get("num_classes")), ("path", conf.get("path")),
                           ("resolution", conf.get("resolution")), ("projector_embed_dims", dims)):
            given = getattr(cfg, flag)
            if flag == "projector_embed_dims" and given is not None:
                given = ",".join(d.strip() for d in given.split(","))
            if given is not None and given != have:
                raise UserError(f"--{flag.replace('_', '-')} {given} contradicts the checkpoint's config "
                                f"({have}); drop the flag for our checkpoints")
        info = dict(model=name, path=conf.get("path", "linear"), vae=conf.get("vae", "sd-vae-ft-ema"),
                    scale=float(conf.get("latent_scale", SD_VAE_SCALE)),
                    shift=float(conf.get("latent_shift", SD_VAE_SHIFT)),
                    resolution=int(conf.get("resolution", kwargs.get("input_size", 32) * 8)),
                    classes=list(conf.get("classes", [])))
        what = f"{name} from its config.json"
    else:  # official: flags, then the Namespace args, then the reference defaults (REPA generate.py)
        name = cfg.model or args.get("model") or "SiT-XL/2"
        res = cfg.resolution or int(args.get("resolution") or 256)
        dims = cfg.projector_embed_dims or "768"
        try:
            z_dims = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise UserError(f"--projector-embed-dims must be comma-separated integers, got {dims!r}") from None
        kwargs = dict(input_size=res // 8, num_classes=cfg.num_classes or int(args.get("num_classes") or 1000),
                      encoder_depth=cfg.encoder_depth or int(args.get("encoder_depth") or 8), z_dims=z_dims,
                      class_dropout_prob=0.1)
        info = dict(model=name, path=cfg.path or args.get("path_type") or "linear", vae="sd-vae-ft-ema",
                    scale=SD_VAE_SCALE, shift=SD_VAE_SHIFT, resolution=res, classes=[])
        what = f"{name} built from the flags (--model {name} --encoder-depth {kwargs['encoder_depth']} " \
               f"--projector-embed-dims {dims} --resolution {res} --num-classes {kwargs['num_classes']})"
    if name not in SiT_models:
        raise UserError(f"unknown model '{name}' (--model); choose one of: {', '.join(sorted(SiT_models))}")
    try:
        model = SiT_models[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {name}: {e}") from e
    check_state_dict(model, sd, path=meta["path"], what=what)
    model.load_state_dict(sd, strict=True)
    if cfg.path is not None:
        info["path"] = cfg.path
    # The projectors only feed the training loss: drop them so sampling doesn't pay for them (~4% of XL/2).
    model.projectors = torch.nn.ModuleList()
    return Loaded(model=model.eval().requires_grad_(False), meta=meta, info=info)


class Velocity:
    """The sampler's view of the model: fp32 in, first output out; bf16 and torch.compile on CUDA prepared once.

    With bf16 the matmul and conv weights are cast to bf16 once, here, and the forward runs under bf16 autocast,
    which then has no weights left to cast per call; norms, embeddings and the residual stream stay as autocast
    keeps them, so the numbers are the per-call autocast ones. On CUDA the forward is compiled (one graph per
    batch shape: the plain and the CFG-doubled batch); REPA_COMPILE=0 turns that off.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, compile_: bool | None = None):
        self.model, self.device, self.num_classes = model, device, model.num_classes
        self.bf16 = precision == "bf16"
        if self.bf16:
            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    m.to(torch.bfloat16)
        if compile_ is None:
            compile_ = device.type == "cuda" and os.environ.get("REPA_COMPILE", "1") != "0"
        self.forward = torch.compile(model, dynamic=False) if compile_ else model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            v = self.forward(x, t, y=y)[0]
        return v.float(), ()


def set_precision(precision: str) -> None:
    """tf32 (the reference's default) allows TF32 matmuls/convs; fp32 forbids them; bf16 autocasts the SiT."""
    tf32 = precision != "fp32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


# ---- seeds and the plan ---------------------------------------------------------------------------------------

def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, index) through SeedSequence, so nearby indices are uncorrelated."""
    a, b = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(a) << 32) | int(b))


def balanced_labels(seed: int, num_samples: int, num_classes: int) -> np.ndarray:
    """A seeded shuffle of 0..C-1 repeated: class counts differ by at most one."""
    perm = np.random.default_rng([seed, 0xBA1]).permutation(num_samples)
    return (perm % num_classes).astype(np.int64)


def draw_inputs(cfg: SampleConfig, indices: range, shape: tuple[int, ...], num_classes: int,
                balanced: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
    """(noise (N, C, H, W), labels (N,), generators): each from sample i's own generator."""
    gens = [sample_generator(cfg.seed, i) for i in indices]
    labels = [int(torch.randint(num_classes, (1,), generator=g)) for g in gens]  # drawn always: same noise stream
    if balanced is not None:
        labels = [int(balanced[i]) for i in indices]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])  # (N, C, H, W)
    return noise, torch.tensor(labels, dtype=torch.long), gens


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    return [range(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def shard_done(out: Path, k: int, fingerprint: dict[str, Any]) -> bool:
    """A shard counts only with its sidecar, the same settings, and the recorded size on disk."""
    side, tar = out / "shards" / f"{SHARD_NAME.format(k)}.json", out / "shards" / f"{SHARD_NAME.format(k)}.tar"
    if not side.is_file():
        return False
    rec = read_json(side, "shard sidecar")
    if rec.get("settings") != fingerprint:
        raise UserError(f"{out} already holds samples made with other settings ({side.name}: "
                        f"{_first_diff(rec.get('settings') or {}, fingerprint)}); use another --out or delete it")
    return tar.is_file() and tar.stat().st_size == rec.get("bytes")


def _first_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            return f"{k} was {old.get(k)!r}, now {new.get(k)!r}"
    return "unknown difference"


def run_shard(cfg: SampleConfig, k: int, idx: range, lm: Loaded, vae, device: torch.device,
              balanced: np.ndarray | None, bar) -> None:
    model, info = lm.model, lm.info
    shape = (model.in_channels, model.input_size, model.input_size)
    fn = lm.velocity or Velocity(model, device, cfg.precision)
    samples = []
    for a in range(idx.start, idx.stop, cfg.batch_size):
        sub = range(a, min(a + cfg.batch_size, idx.stop))
        noise, y, gens = draw_inputs(cfg, sub, shape, model.num_classes, balanced)
        kw = dict(cfg_scale=cfg.cfg_scale, guidance_low=cfg.guidance_low, guidance_high=cfg.guidance_high,
                  path=info["path"], null_class=model.num_classes)
        if cfg.mode == "sde":
            z = sample_sde(fn, noise.to(device), y.to(device), steps=cfg.steps, generator=gens, **kw)
        else:
            z = sample_ode(fn, noise.to(device), y.to(device), steps=cfg.steps, heun=cfg.heun, **kw)
        if not bool(torch.isfinite(z).all()):  # one sync per batch; NaN would silently become black images
            raise UserError(f"sampling produced non-finite latents for samples {sub.start}..{sub.stop - 1} "
                            f"(corrupt checkpoint or overflow; try --precision fp32)")
        imgs = decode(vae, z, info["scale"], info["shift"])  # (N, H, W, 3) uint8
        samples += [{"__key__": f"sample_{i:07d}", "png": png_bytes(im), "cls": int(c)}
                    for i, im, c in zip(sub, imgs, y.tolist())]
        bar.update(len(sub))
    shards = storage.path(cfg.out) / "shards"
    info_ = write_shard(shards / f"{SHARD_NAME.format(k)}.tar", samples)
    pause = os.environ.get(PAUSE_ENV, "")
    if pause and int(pause.split(":")[0]) == k:
        print(f"[test hook] pausing after shard {k}'s tar", file=sys.stderr, flush=True)
        time.sleep(float(pause.split(":")[1]))
    atomic_write_json(shards / f"{SHARD_NAME.format(k)}.json",
                      {"version": SIDECAR_VERSION, "keys": info_.keys, "sha256": info_.sha256,
                       "bytes": info_.bytes, "settings": fingerprint_of(cfg, lm)})


def fingerprint_of(cfg: SampleConfig, lm: Loaded) -> dict[str, Any]:
    """The settings a finished shard was made with; a re-run must match them to reuse it."""
    keep = ("num_samples", "mode", "steps", "heun", "cfg_scale", "guidance_low", "guidance_high", "seed",
            "balanced", "shard_size", "precision")
    return {**{k: getattr(cfg, k) for k in keep}, "ckpt_sha256": lm.meta["sha256"], "model": lm.info["model"],
            "path": lm.info["path"], "vae": lm.info["vae"]}


# ---- the job --------------------------------------------------------------------------------------------------

def _dist() -> tuple[int, int, int]:
    """(rank, world, local_rank); under torchrun a gloo group is enough: ranks only need barriers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, dry = resolve(argv)
    if dry:
        print(dumps(cfg))
        return 0
    rank, world, local = _dist()
    cfg.batch_size = per_rank_batch(cfg, world)  # --batch-size is global, as in train
    try:
        run(cfg, argv, rank, world, local)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


@torch.no_grad()
def run(cfg: SampleConfig, argv: list[str], rank: int, world: int, local: int) -> None:
    from tqdm import tqdm

    from pipeline.encoders import load_vae
    out = ensure_writable_dir(cfg.out)
    set_precision(cfg.precision)
    device = torch.device(cfg.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    lm = load_model(cfg)
    check_resolution(cfg, lm.info["resolution"])
    lm.meta["sha256"] = sha256_file(lm.meta["path"])
    lm.info["vae"] = cfg.vae or lm.info["vae"]
    lm.model.to(device)
    lm.velocity = Velocity(lm.model, device, cfg.precision)
    vae = load_vae(lm.info["vae"], device=device)
    balanced = balanced_labels(cfg.seed, cfg.num_samples, lm.model.num_classes) if cfg.balanced else None
    fp = fingerprint_of(cfg, lm)
    shards = shard_ranges(cfg.num_samples, cfg.shard_size)
    if rank == 0 and (out / "shards").is_dir():
        remove_tmp_files(out / "shards")  # half-written leftovers of a killed run
    _barrier(world)
    pending = [k for k in range(len(shards)) if not shard_done(out, k, fp)]
    _barrier(world)  # every rank has the same plan before anyone writes
    mine = pending[rank::world]
    todo = sum(len(shards[k]) for k in mine)
    calls = nfe(cfg.mode, cfg.steps, cfg.heun)
    with tqdm(total=todo, unit="sample", disable=rank != 0, dynamic_ncols=True,
              desc=f"{cfg.mode} {calls} NFE cfg {cfg.cfg_scale} (rank 0/{world})") as bar:  # closed before errors print
        for k in mine:
            run_shard(cfg, k, shards[k], lm, vae, device, balanced, bar)
    _barrier(world)
    if rank == 0:
        finish(cfg, lm, out, shards, fp, command=" ".join(["python -m trainer sample", *argv]))


def finish(cfg: SampleConfig, lm: Loaded, out: Path, shards: list[range], fp: dict[str, Any], command: str) -> None:
    """After every shard exists: grid.png, samples.npz (optional), then the manifest, last."""
    missing = [k for k in range(len(shards)) if not shard_done(out, k, fp)]
    if missing:
        raise UserError(f"{len(missing)} shard(s) missing after sampling (first {SHARD_NAME.format(missing[0])}); "
                        f"did a rank fail? re-run the same command to finish")
    paths = [out / "shards" / f"{SHARD_NAME.format(k)}.tar" for k in range(len(shards))]
    res = lm.info["resolution"]
    write_grid(out / "grid.png", paths)
    if cfg.npz:
        write_npz(out / "samples.npz", paths, cfg.num_samples, (res, res))
    entries = []
    for k, sp in enumerate(paths):
        rec = read_json(sp.with_suffix(".json"), "shard sidecar")
        entries.append(ShardEntry(url=f"shards/{sp.name}", nsamples=len(rec["keys"]), sha256=rec["sha256"],
                                  bytes=rec["bytes"]))
    sampler = {k: v for k, v in asdict(cfg).items() if k not in ("ckpt", "out", "device")}
    sampler.update(path=lm.info["path"], vae=lm.info["vae"], nfe=nfe(cfg.mode, cfg.steps, cfg.heun),
                   latent_scale=lm.info["scale"], latent_shift=lm.info["shift"], model=lm.info["model"])
    m = Manifest(root=out, name=f"samples-{lm.info['model'].replace('/', '-')}-{cfg.mode}-cfg{cfg.cfg_scale}",
                 shardlist=entries, kind="samples", num_samples=cfg.num_samples,
                 fields={"png": {"dtype": "uint8", "shape": [res, res, 3], "codec": "png"},
                         "cls": {"dtype": "int64", "shape": [], "codec": "int"}},
                 classes=lm.info["classes"], preprocess={"resolution": res},
                 created_by={"version": _version(), "command": command},
                 extra={"sampler": sampler,
                        "checkpoint": {"path": lm.meta.get("url") or str(storage.resolve(lm.meta["path"])), "sha256": lm.meta["sha256"],
                                       "step": lm.meta.get("step"), "format": lm.meta.get("format")}})
    write_manifest(m)
    print(json.dumps({"manifest": str(m.path), "num_samples": cfg.num_samples, "nfe": sampler["nfe"]}))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("repa")
    except PackageNotFoundError:
        return "dev"
