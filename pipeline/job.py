"""The extract job: list inputs, plan shards, run the pending ones on Ray, assemble the manifest."""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from common import UserError, check
from common.errors import free_space
from manifests import load_manifest, storage
from manifests.io import ensure_writable_dir
from manifests.lease import hold

from .config import ExtractConfig, content_settings  # noqa: F401 - ExtractConfig: the job's public name
from .coco import list_captioned
from .sources import list_source, select
from .worker import ShardEncoder, cpu_threads_default, decode_shard
from .writer import assemble_manifest, clean_tmp, fingerprint, plan_shards, shard_done


def run_extract(cfg: ExtractConfig) -> Path:
    """Make OUT/manifest.json; safe to re-run after any kill: finished shards are kept, the rest rebuilt."""
    cfg.validate()
    listing = list_captioned(cfg.source, cfg.captions) if cfg.text_encoder else list_source(cfg.source)
    items = select(listing.items, cfg.limit)
    out = ensure_writable_dir(storage.resolve(cfg.out))  # a folder, or s3://bucket/prefix written by every actor
    ensure_writable_dir(out / "shards", "shard folder")
    lease = hold(out, "pipeline extract")  # one writer per --out; a second job gets one line naming the holder
    removed = clean_tmp(out, before=lease.started)  # only what dead holders left
    if removed:
        print(f"removed {removed} half-written tmp file(s) from an interrupted run", file=sys.stderr)
    plans = plan_shards(items, cfg.shard_size)
    fp = fingerprint(content_settings(cfg), items)
    pending = [p for p in plans if not shard_done(out, p, fp, verify=cfg.verify)]
    print(f"{len(items)} inputs, {len(plans)} shards: {len(plans) - len(pending)} finished, {len(pending)} to do",
          file=sys.stderr)
    if pending:
        _run_ray(cfg, out, fp, pending, total=len(items))
    default_name = f"{storage.resolve(cfg.source.split('{')[0]).name}{cfg.resolution}-features"
    m = assemble_manifest(out, plans, name=cfg.name or default_name, classes=listing.classes,
                          preprocess={"resolution": cfg.resolution, "crop": cfg.crop_name, "hflip": cfg.hflip,
                                      "source": listing.kind, "limit": cfg.limit,
                                      **({"captions": str(cfg.captions)} if cfg.captions else {})},
                          extra_skipped=listing.skipped, field_extra=_context_extra(cfg, out),
                          created_by={"version": _version(), "config": asdict(cfg),
                                      "command": " ".join(["python -m pipeline extract", *sys.argv[2:]])})
    if cfg.verify:
        load_manifest(out, verify=True)
    lease.release()
    return m.path


def _context_extra(cfg: ExtractConfig, out) -> dict | None:
    """With a text encoder: the empty caption's context, written beside the manifest before it (DESIGN §9)."""
    if not cfg.text_encoder:
        return None
    from .text import CONTEXT, write_empty_context
    return {CONTEXT: write_empty_context(cfg.text_encoder, out)}


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
    rows = [{"shard": p.index, "resolution": cfg.resolution, "crop": cfg.crop_name,
             "items": json.dumps([it.to_dict() for it in p.items])} for p in pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one block per shard: parallel decode tasks
    # Reserve memory for one shard of crops (+ a copy). The distinct remote args also keep Ray from fusing decode
    # into the actor, so decoding stays in CPU tasks that run while the actor encodes earlier shards.
    decode_mem = 2 * cfg.shard_size * cfg.resolution ** 2 * 3 + (256 << 20)  # + the worker itself
    ds = ds.map(decode_shard, num_cpus=1, memory=decode_mem)
    ds = ds.map_batches(ShardEncoder, fn_constructor_kwargs={"cfg": cfg, "fingerprint": fp, "out": str(out),
                                                                   "cpu_threads": threads}, batch_size=1,
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
