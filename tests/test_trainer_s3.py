"""The trainer reading shards from a real S3 server (moto over HTTP): ranged GETs + cache, and --stream resume."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import make_features_manifest
from common import run_cli
from manifests import storage
from trainer.__main__ import main as trainer_main


def _args(manifest, run, *extra: str, steps: int = 4, batch: int = 4) -> list[str]:
    return ["train", "--manifest", str(manifest), "--run-dir", str(run), "--model", "SiT-Debug/2",
            "--batch-size", str(batch), "--steps", str(steps), "--ckpt-every", "2", "--log-every", "1",
            "--precision", "fp32", "--num-workers", "0", "--trace-data", *extra]


def _trace(run) -> dict[int, list]:
    """step -> keys of that step (a resumed run's later lines win, as a reader of the log would take them)."""
    out: dict[int, list] = {}
    for line in (Path(run) / "trace" / "rank0.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "keys" not in d:  # the final weights digest line
            continue
        out.setdefault(d["step"], {})[d["micro"]] = d["keys"]
    return {s: [k for m in sorted(v) for k in v[m]] for s, v in out.items()}


def _weights(run, step: int) -> dict:
    return torch.load(Path(run) / "checkpoints" / f"{step:07d}.pt", weights_only=True)["model"]


def _upload(local: Path, url: str) -> None:
    obj = storage.path(url)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            (obj / p.relative_to(local).as_posix()).write_bytes(p.read_bytes())


def test_training_from_s3_equals_local_disk(tiny_features, s3_bucket, tmp_path, capsys):
    """Pipeline shards in a bucket (sidecar offsets, ranged GETs, 2 loader workers, a shard cache): the same
    samples per step and bit-identical weights as reading the same shards from local disk."""
    _upload(tiny_features, f"{s3_bucket}/feats")
    assert run_cli(trainer_main, _args(tiny_features, tmp_path / "local")) == 0
    cache = tmp_path / "cache"
    remote = _args(f"{s3_bucket}/feats", tmp_path / "s3", "--num-workers", "2", "--cache-dir", str(cache))
    assert run_cli(trainer_main, remote) == 0, capsys.readouterr().err
    assert _trace(tmp_path / "s3") == _trace(tmp_path / "local")
    a, b = _weights(tmp_path / "local", 4), _weights(tmp_path / "s3", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cached = sorted(cache.glob("*.tar"))  # each shard read once is kept, under its sha256
    shas = {json.loads((tiny_features / "manifest.json").read_text())["shardlist"][i]["sha256"][:32]
            for i in range(3)}
    assert cached and {p.stem for p in cached} <= shas
    # Served from the cache: count the cache's reads and the store's ranged GETs. (The old test never checked the
    # cache served anything; planted bug this catches: ShardCache.pread always returning None.)
    from trainer.data import ranged
    hits, fetched = [], []
    real_pread, real_fetch = ranged.ShardCache.pread, ranged.fetch_ranges

    def pread(self, *a):
        got = real_pread(self, *a)
        hits.append(got is not None)
        return got

    def fetch(urls, *a):
        fetched.extend(urls)
        return real_fetch(urls, *a)
    ranged.ShardCache.pread, ranged.fetch_ranges = pread, fetch
    try:
        assert run_cli(trainer_main, _args(f"{s3_bucket}/feats", tmp_path / "s3c", "--cache-dir", str(cache))) == 0
    finally:
        ranged.ShardCache.pread, ranged.fetch_ranges = real_pread, real_fetch
    assert _trace(tmp_path / "s3c") == _trace(tmp_path / "local")  # served from the cache: same data
    assert sum(hits) > 0 and sum(hits) + len(fetched) == len(hits)  # cached shards were read locally


def test_stream_mode_resume_continues_the_same_stream(s3_bucket, tmp_path, capsys):
    """--stream: an interrupted run resumed from its checkpoint reads exactly the samples an uninterrupted run
    reads next (shard + sample offset), and ends with the same weights."""
    make_features_manifest(f"{s3_bucket}/sf", num=20, classes=4, shard_size=6)  # shards of 6, 6, 6, 2
    url = f"{s3_bucket}/sf"
    assert run_cli(trainer_main, _args(url, tmp_path / "full", "--stream", steps=6, batch=4)) == 0
    assert run_cli(trainer_main, _args(url, tmp_path / "cut", "--stream", steps=3, batch=4)) == 0
    assert run_cli(trainer_main, _args(url, tmp_path / "cut", "--stream", steps=6, batch=4)) == 0  # resumes from its last checkpoint
    err = capsys.readouterr().err
    full, cut = _trace(tmp_path / "full"), _trace(tmp_path / "cut")
    assert full == cut, err
    seen = [k for s in range(5) for k in full[s]]  # 20 samples in 5 steps: one epoch, each sample once
    assert len(set(seen)) == 20
    a, b = _weights(tmp_path / "full", 6), _weights(tmp_path / "cut", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
