"""`--run-dir s3://bucket/run`: the run lives in a local mirror folder and is pushed to the bucket as whole objects,
so it behaves as a local run folder does (DESIGN §4, §9):

- push order: checkpoints, then the exports, config and stats that name their step, then tb/, samples/, log, DONE;
  an object is uploaded when its bytes differ (ETag checksums, not sizes);
- retention and `--resume-from` are mirrored: a checkpoint or export moved to abandoned/ locally is uploaded there
  and deleted from checkpoints/ or export/ in the bucket, and the bucket keeps only what --keep-last/--keep-every
  keep, so an abandoned branch never comes back on another machine;
- stats.jsonl is never replaced by a shorter copy without the longer one kept under abandoned/;
- `pull` walks back from the newest checkpoint to the newest readable one, confines every key to the mirror,
  and aborts multipart uploads that dead holders left under the run prefix.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from common import UserError
from manifests import storage
from manifests.lease import Lease, hold as hold_lease
from manifests.object_checks import abort_uploads, same_bytes
from manifests.remote_inputs import cache_root
from manifests.runs import (ABANDONED, CKPT_DIR, CONFIG_NAME, DONE_MARKER, EXPORT_DIR, LOG_NAME, STATS_NAME,
                            TB_DIR)

# In push order: a checkpoint before the export, config and stats that name its step; DONE last.
PUSH = (f"{CKPT_DIR}/*.pt", f"{EXPORT_DIR}/*.safetensors", f"{EXPORT_DIR}/{CONFIG_NAME}", CONFIG_NAME, STATS_NAME,
        f"{CKPT_DIR}/{ABANDONED}/*", f"{EXPORT_DIR}/{ABANDONED}/*", f"{TB_DIR}/**/*", "samples/**/*", "loss.png",
        LOG_NAME, DONE_MARKER)
PRUNED = ((CKPT_DIR, ".pt"), (EXPORT_DIR, ".safetensors"))  # folders whose retention the bucket mirrors


def mirror_for(url: str) -> Path:
    return cache_root() / "runs" / hashlib.sha256(url.encode()).hexdigest()[:24]


def _obj(url: str):
    obj = storage.path(url)
    if not obj.is_remote:
        raise UserError(f"{url} is not an object-store URL")
    return obj


_held: dict[str, tuple[Lease, str | None]] = {}  # local run folder -> (its lease, its URL), for finish()


def hold(run_dir: str, run_url: str | None) -> Lease:
    """The run folder's lease for this process (rank 0), released by finish() (or, failing that, at exit)."""
    lease = hold_lease(run_url or run_dir, "trainer train", "run folder (--run-dir)")
    _held[str(mirror_for(_obj(run_url).url) if run_url else Path(run_dir))] = (lease, run_url)
    return lease


def finish(run_dir: str | Path) -> None:
    """The end of a run (after DONE is written): one last push of an s3:// run, so DONE, log.txt and tb/ written
    after the last checkpoint reach the bucket, then the lease is released. No-op on ranks without a lease."""
    lease, run_url = _held.pop(str(Path(run_dir)), (None, None))
    if lease is None:
        return
    try:
        if run_url and not lease.lost:
            push(Path(run_dir), run_url)
    finally:
        lease.release()


def pull(url: str, lease: Lease | None = None) -> Path:
    """The local mirror of run `url`: config, stats, and the newest readable checkpoint (walking back past
    unreadable ones); nothing is written if any key would leave the mirror."""
    from manifests.io import ensure_writable_dir
    from trainer.loop.checkpoint import load
    obj = _obj(url)
    ensure_writable_dir(obj, "run folder (--run-dir)")
    if lease is not None:
        abort_uploads(obj, before=lease.started)  # unfinished uploads of a dead holder of this run
    local = mirror_for(obj.url)
    have = obj.listing()
    dests = {k: storage.confine(local, k, obj.url) for k in have}  # every key checked before anything is written
    local.mkdir(parents=True, exist_ok=True)
    for k in (CONFIG_NAME, STATS_NAME):
        if k in have and not (dests[k].is_file() and same_bytes(have[k], dests[k])):
            (obj / k).download(dests[k], int(have[k]["size"]))
    ckpts = sorted(k for k in have if k.startswith(f"{CKPT_DIR}/") and k.count("/") == 1 and k.endswith(".pt"))
    for k in reversed(ckpts):
        dest = dests[k]
        if not (dest.is_file() and same_bytes(have[k], dest)):
            (obj / k).download(dest, int(have[k]["size"]))
        try:
            load(dest)
            break
        except UserError as e:  # a bad newest checkpoint: resume from the one before, never from step 0
            print(f"warning: skipping unreadable checkpoint {obj / k}: {e}", file=sys.stderr)
            dest.unlink(missing_ok=True)
    return local


def _retention(local: Path) -> tuple[int, int] | None:
    try:
        train = json.loads((local / CONFIG_NAME).read_text()).get("train", {})
        return int(train["keep_last"]), int(train["keep_every"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def push(local: Path, url: str) -> int:
    """Upload what differs (checkpoints first), then mirror retention and abandonment; returns the upload count."""
    from trainer.loop.checkpoint import kept_steps
    obj = _obj(url)
    local = Path(local)
    have = obj.listing()
    n = 0
    for pattern in PUSH:
        for p in sorted(local.glob(pattern)):
            rel = p.relative_to(local).as_posix()
            if not p.is_file() or p.name.startswith(storage.TMP_MARK) or same_bytes(have.get(rel), p):
                continue
            if rel == STATS_NAME and rel in have and int(have[rel]["size"]) > p.stat().st_size:
                keep = f"{ABANDONED}/{STATS_NAME[:-6]}-{int(time.time())}.jsonl"  # the longer history, kept
                (obj / rel).download(local / keep)
                (obj / keep).upload(local / keep)
            (obj / rel).upload(p)
            n += 1
    keep = _retention(local)
    have = obj.listing() if n else have  # what the bucket holds now: retention over every step, new ones too
    for folder, ext in PRUNED:
        remote = {k: k.split("/")[1] for k in have if k.startswith(f"{folder}/") and k.count("/") == 1
                  and k.endswith(ext)}
        steps = {k: int("".join(c for c in name if c.isdigit()) or -1) for k, name in remote.items()}
        kept = kept_steps(sorted(set(steps.values())), *keep) if keep else set(steps.values())
        for k, step in steps.items():
            abandoned = (local / folder / ABANDONED / remote[k]).is_file()
            if abandoned or step not in kept:
                (obj / k).unlink(missing_ok=True)
    return n
