"""The extract job: list inputs, plan shards, run the pending ones on Ray, assemble the manifest."""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import UserError, check
from manifests import load_manifest, storage
from manifests.codecs import CODECS, DEFAULT_CODEC
from common.errors import free_space
from manifests.io import ensure_writable_dir

from .presets import ENCODERS, VAES, parse_spec
from .sources import list_source, select
from .worker import PRECISIONS, EncodeConfig, ShardEncoder, cpu_threads_default, decode_shard
from .writer import assemble_manifest, clean_tmp, fingerprint, plan_shards, shard_done

RESOLUTIONS = (128, 256, 512)  # 128: the CPU demo (an 8x8 token grid for the tiny encoders and SiT/2)
FEATURE_DTYPES = tuple(CODECS)  # token codecs (manifests/codecs.py); .npy has no bfloat16


@dataclass(kw_only=True)
class ExtractConfig:
    """`python -m pipeline extract` settings (DESIGN §3, §8)."""
    source: str
    out: str
    resolution: int = 256
    vae: str = "sd-vae-ft-ema"
    encoders: list[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    shard_size: int = 1000
    batch_size: int = 64
    hflip: bool = False
    feature_dtype: str = DEFAULT_CODEC
    limit: int | None = None
    num_gpus: int | None = None  # GPU actors; None: every GPU in the cluster (one CPU actor without GPUs)
    num_cpus: int | None = None  # local Ray only; None: all cores
    cpu_actors: int = 1  # encoder actors when the cluster has no GPU (several write shards concurrently)
    precision: str = "default"
    verify: bool = False
    name: str | None = None
    ray_address: str | None = None  # None: RAY_ADDRESS (set by `ray job submit`), else a new local Ray

    def validate(self) -> None:
        """Every bad value is a one-line UserError naming the flag."""
        check(self.resolution in RESOLUTIONS, f"--resolution must be one of {RESOLUTIONS}, got {self.resolution}")
        for flag, v in (("--shard-size", self.shard_size), ("--batch-size", self.batch_size)):
            check(v > 0, f"{flag} must be a positive count, got {v}")
        check(self.limit is None or self.limit > 0, f"--limit must be a positive count, got {self.limit}")
        check(self.num_gpus is None or self.num_gpus >= 0, f"--num-gpus must be >= 0, got {self.num_gpus}")
        check(self.num_cpus is None or self.num_cpus > 0, f"--num-cpus must be positive, got {self.num_cpus}")
        check(self.cpu_actors > 0, f"--cpu-actors must be a positive count, got {self.cpu_actors}")
        check(self.feature_dtype in FEATURE_DTYPES, f"--feature-dtype must be one of {FEATURE_DTYPES}")
        check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        check(len(self.encoders) > 0, "--encoders needs at least one encoder name")
        vname, _ = parse_spec(self.vae)
        check(vname in VAES, f"unknown VAE '{vname}' (--vae); choose one of: {', '.join(sorted(VAES))}")
        names = [parse_spec(e)[0] for e in self.encoders]
        for n in names:
            check(n in ENCODERS, f"unknown encoder '{n}' (--encoders); choose from: {', '.join(sorted(ENCODERS))}")
        check(len(set(names)) == len(names), f"--encoders lists an encoder twice: {','.join(names)}")


def content_settings(cfg: ExtractConfig) -> dict:
    """The settings that decide shard bytes (not --num-gpus, --verify or --limit itself)."""
    return {"resolution": cfg.resolution, "vae": cfg.vae, "encoders": cfg.encoders, "shard_size": cfg.shard_size,
            "batch_size": cfg.batch_size, "hflip": cfg.hflip, "feature_dtype": cfg.feature_dtype,
            "precision": cfg.precision}


def run_extract(cfg: ExtractConfig) -> Path:
    """Make OUT/manifest.json; safe to re-run after any kill: finished shards are kept, the rest rebuilt."""
    cfg.validate()
    listing = list_source(cfg.source)
    items = select(listing.items, cfg.limit)
    out = ensure_writable_dir(storage.resolve(cfg.out))  # a folder, or s3://bucket/prefix written by every actor
    ensure_writable_dir(out / "shards", "shard folder")
    removed = clean_tmp(out)
    if removed:
        print(f"removed {removed} half-written tmp file(s) from an interrupted run", file=sys.stderr)
    plans = plan_shards(items, cfg.shard_size)
    fp = fingerprint(content_settings(cfg), items)
    pending = [p for p in plans if not shard_done(out, p, fp, verify=cfg.verify)]
    print(f"{len(items)} inputs, {len(plans)} shards: {len(plans) - len(pending)} finished, {len(pending)} to do",
          file=sys.stderr)
    if pending:
        _run_ray(cfg, out, fp, pending, total=len(items))
    m = assemble_manifest(out, plans, name=cfg.name or f"{storage.resolve(cfg.source.split('{')[0]).name}{cfg.resolution}-features",
                          classes=listing.classes,
                          preprocess={"resolution": cfg.resolution, "crop": "adm-center", "hflip": cfg.hflip,
                                      "source": listing.kind, "limit": cfg.limit},
                          extra_skipped=listing.skipped,
                          created_by={"version": _version(), "config": asdict(cfg),
                                      "command": " ".join(["python -m pipeline extract", *sys.argv[2:]])})
    if cfg.verify:
        load_manifest(out, verify=True)
    return m.path


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("repa")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "unknown"


def _init_ray(cfg: ExtractConfig):
    """Attach to RAY_ADDRESS (ray job submit) or start a quiet local Ray; never silently join a stray cluster."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    if ray.is_initialized():
        return ray
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    return ray


def _run_ray(cfg: ExtractConfig, out: Path, fp: str, pending, total: int) -> None:
    """CPU tasks decode whole shards while the actor pool encodes and writes earlier ones (streaming)."""
    from tqdm import tqdm
    ray = _init_ray(cfg)
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar below counts images
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus_avail = int(ray.cluster_resources().get("GPU", 0))
    n_gpu = gpus_avail if cfg.num_gpus is None else min(cfg.num_gpus, gpus_avail)
    check(cfg.num_gpus is None or cfg.num_gpus <= gpus_avail,
          f"--num-gpus {cfg.num_gpus} but the Ray cluster has {gpus_avail} GPU(s)")
    actors = max(1, min(n_gpu or cfg.cpu_actors, len(pending)))
    threads = cpu_threads_default()
    enc_cfg = EncodeConfig(out=str(out), fingerprint=fp, resolution=cfg.resolution, vae=cfg.vae,
                           encoders=list(cfg.encoders), batch_size=cfg.batch_size, hflip=cfg.hflip,
                           feature_dtype=cfg.feature_dtype, precision=cfg.precision, cpu_threads=threads)
    rows = [{"shard": p.index, "resolution": cfg.resolution, "items": json.dumps([it.to_dict() for it in p.items])}
            for p in pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one block per shard: parallel decode tasks
    # Reserve memory for one shard of crops (+ a copy). The distinct remote args also keep Ray from fusing decode
    # into the actor, so decoding stays in CPU tasks that run while the actor encodes earlier shards.
    decode_mem = 2 * cfg.shard_size * cfg.resolution ** 2 * 3 + (256 << 20)  # + the worker itself
    ds = ds.map(decode_shard, num_cpus=1, memory=decode_mem)
    ds = ds.map_batches(ShardEncoder, fn_constructor_kwargs={"cfg": enc_cfg.to_dict()}, batch_size=1,
                        batch_format="numpy", compute=actor_pool(actors),
                        num_gpus=1 if n_gpu else 0, num_cpus=1 if n_gpu else threads)
    done_items = total - sum(len(p.items) for p in pending)
    bar = tqdm(total=total, initial=done_items, unit="img", desc="extract", dynamic_ncols=True, smoothing=0.1)
    t0, n_new, n_skip, n_shards = time.time(), 0, 0, 0
    try:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            for ns, nk in zip(batch["nsamples"], batch["nskipped"]):
                n_new += int(ns)
                n_skip += int(nk)
                n_shards += 1
                bar.update(int(ns) + int(nk))
                bar.set_postfix(shards=f"{n_shards}/{len(pending)}", skipped=n_skip)  # written by this run
    except Exception as e:  # noqa: BLE001 - a worker's UserError (disk full, ...) surfaces as one line
        user = _find_user_error(e) or _disk_full_error(e, out)
        if user is not None:
            raise user from None
        raise
    finally:
        bar.close()
    dt = max(time.time() - t0, 1e-9)
    print(f"encoded {n_new} images in {dt:.1f}s ({n_new / dt:.1f} img/s on {actors} actor(s)), "
          f"skipped {n_skip}", file=sys.stderr)


def actor_pool(actors: int):
    """Two calls in flight per actor, so a shard's tail write overlaps the next shard's encoding (worker.py's lock
    keeps the device to one encode at a time); an older Ray without these options runs them in turn."""
    import ray.data
    try:
        return ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2,
                                          max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    except TypeError:
        return ray.data.ActorPoolStrategy(size=actors)


def _find_user_error(e: BaseException) -> UserError | None:
    """Ray wraps worker exceptions; find a UserError in the chain and return it as a clean one."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, UserError):
            msg = str(cur.args[0]) if cur.args else str(cur)
            return UserError(msg.strip().splitlines()[-1] if "\n" in msg else msg)
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    return None


def _disk_full_error(e: BaseException, out: Path) -> UserError | None:
    """ENOSPC anywhere in a Ray error (an actor's write, Ray's own spill) -> one line naming --out and free space.

    Ray re-raises a worker's exception as a RayTaskError whose cause may arrive only as text, so the chain and
    the text are both searched.
    """
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            break
        if "[Errno 28]" in str(cur) or "No space left on device" in str(cur):
            break
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    else:
        return None
    return UserError(f"disk full while writing shards to {out}: No space left on device ({free_space(out)} free); "
                     f"free some space and re-run the same command (finished shards are kept)")
