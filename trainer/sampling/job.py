"""`python -m trainer sample`: checkpoint -> the family's sampler (SiT: SDE/ODE, DiT: DDPM/DDIM) -> VAE decode ->
PNG shards + samples manifest.

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

from manifests import (Manifest, ShardEntry, atomic_write_json, read_json, sha256_file,
                       write_manifest, write_shard)
from common import UserError
from manifests import storage
from manifests.io import ensure_writable_dir, remove_tmp_files
from manifests.lease import hold

import trainer.models as models
from trainer.models import Loaded, ModelSpec
from trainer.sampling.output import decode, png_bytes, write_grid, write_npz
# `parse` is re-exported for callers of trainer.sample.
from trainer.sampling.config import (SampleConfig, check_resolution, dumps, parse, per_rank_batch,  # noqa: F401
                                     resolve, settle_mode)
from trainer.sampling.autoguide import AutoGuided, check_compatible, resolve_guide
from trainer.sampling.prompts import Prompts, TextConditioning, read_prompts
from trainer.sampling.samplers import nfe, sample_generator

SHARD_NAME = "samples-{:06d}"
SIDECAR_VERSION = 1
# Test hook (fault injection): "K:SECONDS" sleeps after shard K's tar is in place and before its sidecar,
# so a test can SIGKILL the job at the worst moment (the shard must then be redone, not trusted).
PAUSE_ENV = "REPA_TEST_SAMPLE_PAUSE"


# ---- model ----------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """The loaded model and what this job settled about it: the file's sha256, the VAE, the prepared forward."""
    lm: Loaded
    sha256: str
    vae: str
    velocity: Any = None  # the prepared (cast, compiled) forward, made once per process in run()
    guide: Loaded | None = None  # --guide-ckpt: the autoguidance model
    guide_sha256: str | None = None
    text: TextConditioning | None = None  # text families: captions -> contexts, and the empty context
    prompts: Prompts | None = None  # text families: each sample's caption


def model_spec(cfg: SampleConfig) -> ModelSpec:
    """The sampler's model flags as the loader's spec (they only matter for released files)."""
    dims = None
    if cfg.projector_embed_dims is not None:
        try:
            dims = [int(d) for d in cfg.projector_embed_dims.split(",") if d.strip()]
        except ValueError:
            raise UserError(f"--projector-embed-dims must be comma-separated integers, "
                            f"got {cfg.projector_embed_dims!r}") from None
    return ModelSpec(model=cfg.model, encoder_depth=cfg.encoder_depth, projector_embed_dims=dims,
                     resolution=cfg.resolution, num_classes=cfg.num_classes, path=cfg.path)


def load_model(cfg: SampleConfig) -> Loaded:
    """The checkpoint's model (trainer/models/checkpoints.py), loaded strictly and stripped for sampling; --mode
    and --num-steps left to the family's defaults are filled in here."""
    lm = models.load_model(cfg.ckpt, model_spec(cfg))
    family = lm.family
    text = family.conditioning == "text"
    if text and not (cfg.prompts or cfg.captions):
        raise UserError(f"{lm.name} is text-conditioned: give --prompts FILE (one per line) or --captions "
                        f"ANNOTATIONS.json")
    if not text and (cfg.prompts or cfg.captions or cfg.text_encoder):
        raise UserError(f"{lm.name} is class-conditioned; --prompts, --captions and --text-encoder are for "
                        f"text-to-image models (MMDiT)")
    if text and cfg.balanced:
        raise UserError("--balanced draws class labels; a text-to-image model samples its prompts")
    settle_mode(cfg, list(family.samplers), dict(family.steps), family.cfg_channels, family.name)
    family.prepare_sampling(lm.model)
    return lm


def load_guide(cfg: SampleConfig, main: Loaded) -> Loaded:
    """--guide-ckpt's model through the same loader (its own config decides its size), checked against the main."""
    lm = models.load_model(resolve_guide(cfg.guide_ckpt), ModelSpec())
    if lm.family.conditioning != main.family.conditioning:
        raise UserError(f"--guide-ckpt {cfg.guide_ckpt} is {lm.family.conditioning}-conditioned, the main model "
                        f"{main.family.conditioning}-conditioned")
    check_compatible(main.model, lm.model, main.name, lm.name)
    lm.family.prepare_sampling(lm.model)
    return lm


class Velocity:
    """The sampler's view of the model: fp32 in, first output out; bf16 and torch.compile on CUDA prepared once.

    With bf16 the matmul and conv weights are cast to bf16 once, here, and the forward runs under bf16 autocast,
    which then has no weights left to cast per call; norms, embeddings and the residual stream stay as autocast
    keeps them, so the numbers are the per-call autocast ones. On CUDA the forward is compiled (one graph per
    batch shape: the plain and the CFG-doubled batch); REPA_COMPILE=0 turns that off.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, compile_: bool | None = None,
                 text: bool = False):
        self.model, self.device, self.num_classes = model, device, getattr(model, "num_classes", None)
        self.cond = "context" if text else "y"  # MMDiT takes the caption context by keyword, as the official
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
            v = self.forward(x, t, **{self.cond: y})[0]
        return v.float(), ()


def set_precision(precision: str) -> None:
    """tf32 (the reference's default) allows TF32 matmuls/convs; fp32 forbids them; bf16 autocasts the model."""
    tf32 = precision != "fp32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


# ---- seeds and the plan ---------------------------------------------------------------------------------------

def balanced_labels(seed: int, num_samples: int, num_classes: int) -> np.ndarray:
    """A seeded shuffle of 0..C-1 repeated: class counts differ by at most one."""
    perm = np.random.default_rng([seed, 0xBA1]).permutation(num_samples)
    return (perm % num_classes).astype(np.int64)


def draw_inputs(cfg: SampleConfig, indices: range, shape: tuple[int, ...], num_classes: int | None,
                balanced: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
    """(noise (N, C, H, W), labels (N,), generators): each from sample i's own generator (text families: no
    labels drawn, zeros returned; their captions come from `Prompts`)."""
    gens = [sample_generator(cfg.seed, i) for i in indices]
    labels = [int(torch.randint(num_classes, (1,), generator=g)) if num_classes else 0  # drawn always: same
              for g in gens]  # noise stream
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


def run_shard(cfg: SampleConfig, k: int, idx: range, src: Source, vae, device: torch.device,
              balanced: np.ndarray | None, bar) -> None:
    model, rec = src.lm.model, src.lm.record
    shape = (model.in_channels, model.input_size, model.input_size)
    fn = src.velocity or Velocity(model, device, cfg.precision)
    sampler = src.lm.family.samplers[cfg.mode]
    samples = []
    for a in range(idx.start, idx.stop, cfg.batch_size):
        sub = range(a, min(a + cfg.batch_size, idx.stop))
        noise, y, gens = draw_inputs(cfg, sub, shape, getattr(model, "num_classes", None), balanced)
        texts = [src.prompts.at(i) for i in sub] if src.text is not None else None
        cond = src.text(texts) if texts is not None else y.to(device)  # (N, L, D) contexts or (N,) labels
        null = src.text.empty if src.text is not None else model.num_classes  # CFG's unconditional input
        z = sampler(fn, noise.to(device), cond, steps=cfg.steps, generator=gens, heun=cfg.heun,
                    cfg_scale=cfg.cfg_scale, guidance_low=cfg.guidance_low, guidance_high=cfg.guidance_high,
                    path=rec.path, null_class=null, guide_channels=cfg.cfg_channels)
        if not bool(torch.isfinite(z).all()):  # one sync per batch; NaN would silently become black images
            raise UserError(f"sampling produced non-finite latents for samples {sub.start}..{sub.stop - 1} "
                            f"(corrupt checkpoint or overflow; try --precision fp32)")
        imgs = decode(vae, z, rec.latent_scale, rec.latent_shift)  # (N, H, W, 3) uint8
        samples += [{"__key__": f"sample_{i:07d}", "png": png_bytes(im),
                     **({"txt": texts[j]} if texts is not None else {"cls": int(c)})}
                    for j, (i, im, c) in enumerate(zip(sub, imgs, y.tolist()))]
        bar.update(len(sub))
    shards = storage.path(cfg.out) / "shards"
    info_ = write_shard(shards / f"{SHARD_NAME.format(k)}.tar", samples)
    pause = os.environ.get(PAUSE_ENV, "")
    if pause and int(pause.split(":")[0]) == k:
        print(f"[test hook] pausing after shard {k}'s tar", file=sys.stderr, flush=True)
        time.sleep(float(pause.split(":")[1]))
    atomic_write_json(shards / f"{SHARD_NAME.format(k)}.json",
                      {"version": SIDECAR_VERSION, "keys": info_.keys, "sha256": info_.sha256,
                       "bytes": info_.bytes, "settings": fingerprint_of(cfg, src)})


def fingerprint_of(cfg: SampleConfig, src: Source) -> dict[str, Any]:
    """The settings a finished shard was made with; a re-run must match them to reuse it."""
    keep = ("num_samples", "mode", "steps", "heun", "cfg_scale", "guidance_low", "guidance_high", "seed",
            "balanced", "shard_size", "precision")
    fp = {**{k: getattr(cfg, k) for k in keep}, "ckpt_sha256": src.sha256, "model": src.lm.name,
          "path": src.lm.record.path, "vae": src.vae}
    if cfg.cfg_channels != "all":  # recorded only when not the rule every older shard was made with
        fp["cfg_channels"] = cfg.cfg_channels
    if src.guide is not None:  # autoguidance: another guide is other images
        fp["guide"] = {"model": src.guide.name, "ckpt_sha256": src.guide_sha256}
    if src.text is not None:  # other captions or another text encoder: other images
        fp["text"] = {"prompts_sha256": src.prompts.sha256, **src.text.meta}
    return fp


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
    lease = hold(out, "trainer sample") if rank == 0 else None  # one job per --out; a second gets one line
    set_precision(cfg.precision)
    device = torch.device(cfg.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    lm = load_model(cfg)
    check_resolution(cfg, lm.record.resolution)
    src = Source(lm=lm, sha256=sha256_file(lm.checkpoint.path), vae=cfg.vae or lm.record.vae)
    lm.model.to(device)
    text = lm.family.conditioning == "text"
    src.velocity = Velocity(lm.model, device, cfg.precision, text=text)
    if text:  # captions and the text encoder the run was trained with
        src.prompts = read_prompts(cfg.prompts, cfg.captions, cfg.seed)
        src.text = TextConditioning((lm.checkpoint.config or {}).get("context"), cfg.text_encoder,
                                    int(lm.model.context_embedder.in_features), device)
    if cfg.num_samples is None:
        cfg.num_samples = len(src.prompts) if text else 50_000
    if cfg.guide_ckpt is not None:  # autoguidance: the guide's forward takes the unconditional half's place
        src.guide = load_guide(cfg, lm)
        src.guide_sha256 = sha256_file(src.guide.checkpoint.path)
        src.guide.model.to(device)
        src.velocity = AutoGuided(src.velocity, Velocity(src.guide.model, device, cfg.precision, text=text),
                                  null_class=src.text.empty if text else lm.model.num_classes)
    vae = load_vae(src.vae, device=device)
    balanced = balanced_labels(cfg.seed, cfg.num_samples, lm.model.num_classes) if cfg.balanced else None
    fp = fingerprint_of(cfg, src)
    shards = shard_ranges(cfg.num_samples, cfg.shard_size)
    if rank == 0 and (out / "shards").is_dir():
        remove_tmp_files(out / "shards", lease.started)  # half-written leftovers of a killed run
    _barrier(world)
    pending = [k for k in range(len(shards)) if not shard_done(out, k, fp)]
    _barrier(world)  # every rank has the same plan before anyone writes
    mine = pending[rank::world]
    todo = sum(len(shards[k]) for k in mine)
    calls = nfe(cfg.mode, cfg.steps, cfg.heun)
    with tqdm(total=todo, unit="sample", disable=rank != 0, dynamic_ncols=True,
              desc=f"{cfg.mode} {calls} NFE cfg {cfg.cfg_scale} (rank 0/{world})") as bar:  # closed before errors print
        for k in mine:
            run_shard(cfg, k, shards[k], src, vae, device, balanced, bar)
    _barrier(world)
    if rank == 0:
        finish(cfg, src, out, shards, fp, command=" ".join(["python -m trainer sample", *argv]))
    if lease is not None:
        lease.release()


def finish(cfg: SampleConfig, src: Source, out: Path, shards: list[range], fp: dict[str, Any], command: str) -> None:
    """After every shard exists: grid.png, samples.npz (optional), then the manifest, last."""
    missing = [k for k in range(len(shards)) if not shard_done(out, k, fp)]
    if missing:
        raise UserError(f"{len(missing)} shard(s) missing after sampling (first {SHARD_NAME.format(missing[0])}); "
                        f"did a rank fail? re-run the same command to finish")
    paths = [out / "shards" / f"{SHARD_NAME.format(k)}.tar" for k in range(len(shards))]
    lm, rec = src.lm, src.lm.record
    res = rec.resolution
    write_grid(out / "grid.png", paths)
    if cfg.npz:
        write_npz(out / "samples.npz", paths, cfg.num_samples, (res, res))
    entries = []
    for k, sp in enumerate(paths):
        side = read_json(sp.with_suffix(".json"), "shard sidecar")
        entries.append(ShardEntry(url=f"shards/{sp.name}", nsamples=len(side["keys"]), sha256=side["sha256"],
                                  bytes=side["bytes"]))
    sampler = {k: v for k, v in asdict(cfg).items() if k not in ("ckpt", "out", "device")}
    sampler.update(path=rec.path, vae=src.vae, nfe=nfe(cfg.mode, cfg.steps, cfg.heun),
                   latent_scale=rec.latent_scale, latent_shift=rec.latent_shift, model=lm.name)
    if src.guide is not None:
        sampler["guidance"] = "autoguidance"
        sampler["guide"] = {"model": src.guide.name, "path": src.guide.checkpoint.url or
                            str(storage.resolve(src.guide.checkpoint.path)), "sha256": src.guide_sha256,
                            "step": src.guide.checkpoint.step}
    m = Manifest(root=out, name=f"samples-{lm.name.replace('/', '-')}-{cfg.mode}-cfg{cfg.cfg_scale}",
                 shardlist=entries, kind="samples", num_samples=cfg.num_samples,
                 fields={"png": {"dtype": "uint8", "shape": [res, res, 3], "codec": "png"},
                         **({"txt": {"dtype": "str", "shape": [], "codec": "utf-8", "source": src.prompts.source}}
                            if src.text is not None else {"cls": {"dtype": "int64", "shape": [], "codec": "int"}})},
                 classes=rec.classes, preprocess={"resolution": res},
                 created_by={"version": _version(), "command": command},
                 extra={"sampler": sampler,
                        "checkpoint": {"path": lm.checkpoint.url or str(storage.resolve(lm.checkpoint.path)),
                                       "sha256": src.sha256, "step": lm.checkpoint.step,
                                       "format": lm.checkpoint.format}})
    write_manifest(m)
    print(json.dumps({"manifest": str(m.path), "num_samples": cfg.num_samples, "nfe": sampler["nfe"]}))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("repa")
    except PackageNotFoundError:
        return "dev"
