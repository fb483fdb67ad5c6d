"""`--run-dir s3://bucket/run`: the run lives in a local mirror folder and every checkpoint is pushed to the bucket
as whole objects (checkpoint first, then export, config and stats); a re-run pulls the newest checkpoint back,
so re-running the same command resumes on any machine."""
from __future__ import annotations

from pathlib import Path

from manifests import storage
from manifests.remote_inputs import cache_root
from manifests.runs import CKPT_DIR, CONFIG_NAME, EXPORT_DIR, LOG_NAME, STATS_NAME

# In push order: a checkpoint before the export, config and stats that name its step.
PUSH = (f"{CKPT_DIR}/*.pt", f"{EXPORT_DIR}/*.safetensors", f"{EXPORT_DIR}/{CONFIG_NAME}", CONFIG_NAME, STATS_NAME,
        "loss.png", LOG_NAME)


def mirror_for(url: str) -> Path:
    import hashlib
    return cache_root() / "runs" / hashlib.sha256(url.encode()).hexdigest()[:24]


def pull(url: str) -> Path:
    """The local mirror of run `url`, holding the bucket's newest checkpoint, config and stats (for resume)."""
    obj = storage.path(url)
    assert isinstance(obj, storage.ObjectPath)
    from manifests.io import ensure_writable_dir
    ensure_writable_dir(obj, "run folder (--run-dir)")
    local = mirror_for(obj.url)
    local.mkdir(parents=True, exist_ok=True)
    have = {str(o.relative_to(obj)): (o, n) for o, n in obj.find()}
    ckpts = sorted(k for k in have if k.startswith(f"{CKPT_DIR}/") and k.endswith(".pt"))
    for k in ckpts[-1:] + [k for k in (CONFIG_NAME, STATS_NAME) if k in have]:
        o, n = have[k]
        dest = local / k
        if not (dest.is_file() and dest.stat().st_size == n):
            storage.copy_to_local(o, dest)
    return local


def push(local: Path, url: str) -> int:
    """Upload what changed since the last push, checkpoints before the files that name them; returns a count."""
    obj = storage.path(url)
    assert isinstance(obj, storage.ObjectPath)
    have = {str(o.relative_to(obj)): n for o, n in obj.find()}
    n = 0
    for pattern in PUSH:
        for p in sorted(local.glob(pattern)):
            rel = p.relative_to(local).as_posix()
            if p.name.startswith(".tmp-") or (have.get(rel) == p.stat().st_size and not rel.endswith(".jsonl")):
                continue
            (obj / rel).upload(p)
            n += 1
    return n
