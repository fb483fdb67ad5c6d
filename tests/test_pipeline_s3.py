"""`pipeline extract` straight to and from a real S3 server (moto over HTTP): byte identity, SIGKILL, WebDataset."""
from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import REPO, run_module
from manifests import iter_shard, load_manifest, storage

TINY_ARGS = ["--vae", "tiny-vae", "--encoders", "tiny-dinov2,tiny-siglip", "--shard-size", "8", "--batch-size", "8"]


def _tars(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(storage.path(out).joinpath("shards").glob("*.tar"))}


def _upload(local: Path, url: str) -> None:
    obj = storage.path(url)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            (obj / p.relative_to(local).as_posix()).write_bytes(p.read_bytes())


def _staging_leftovers() -> list[Path]:
    return [p for p in storage.staging_dir().glob("*.staging")]


@pytest.mark.slow
def test_extract_from_s3_imagefolder_to_s3_equals_local_run(synth_dir, tiny_features, s3_bucket):
    """Source under a prefix, output in the bucket: the same shard bytes as the local run of the same inputs."""
    _upload(synth_dir, f"{s3_bucket}/src")
    out = f"{s3_bucket}/feats"
    p = run_module("pipeline", "extract", "--source", f"{s3_bucket}/src", "--out", out, *TINY_ARGS, "--verify",
                   timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _tars(out) == {k: v.read_bytes() for k, v in
                          ((p.name, p) for p in sorted((tiny_features / "shards").glob("*.tar")))}
    m = load_manifest(out, verify=True)
    assert m.num_samples == 24 and str(m.root) == out
    again = run_module("pipeline", "extract", "--source", f"{s3_bucket}/src", "--out", out, *TINY_ARGS, timeout=120)
    assert again.returncode == 0 and "3 finished, 0 to do" in again.stderr, again.stderr


@pytest.mark.slow
def test_sigkill_extract_to_s3_then_resume_is_byte_identical(synth_dir, tiny_features, s3_bucket):
    """SIGKILL `extract --out s3://…` at 3 random moments, re-running after each: shards equal an uninterrupted
    local run, no object is half-written, no multipart upload or staging file is left behind."""
    out, ray_tmp = f"{s3_bucket}/killed", Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    seed = int(os.environ.get("REPA_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp),
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline", "extract", "--source", str(synth_dir), "--out", out, *TINY_ARGS]
    reference = {p.name: p.read_bytes() for p in sorted((tiny_features / "shards").glob("*.tar"))}
    sidecars = storage.path(out) / "shards"
    kills = []
    try:
        for k in range(3):
            p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            while p.poll() is None and len(list(sidecars.glob("*.json"))) < k:
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 0.8))
            done_before = p.poll() is not None
            p.send_signal(signal.SIGKILL)
            p.wait()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            kills.append((k, done_before, len(list(sidecars.glob("*.json")))))
            for tar in sidecars.glob("*.tar"):  # any visible tar is whole: it is one of the reference shards
                assert tar.read_bytes() == reference[tar.name], (seed, kills, tar)
            if (storage.path(out) / "manifest.json").exists():
                load_manifest(out, verify=True)
        victim = sidecars / "train-000000.tar"
        if victim.exists():  # a finished shard truncated in the bucket: the re-run must rebuild it
            victim.write_bytes(victim.read_bytes()[:5000])
        p = run_module("pipeline", "extract", "--source", str(synth_dir), "--out", out, *TINY_ARGS, "--verify",
                       env={"RAY_TMPDIR": str(ray_tmp)}, timeout=300)
        assert p.returncode == 0, f"seed {seed}, kills {kills}:\n{p.stderr[-3000:]}"
        assert _tars(out) == reference, f"seed {seed}, kills {kills}: shards differ from the uninterrupted run"
        m = load_manifest(out, verify=True)
        keys = [s["__key__"] for sh in m.shard_paths() for s in iter_shard(sh, decode=False)]
        assert len(keys) == len(set(keys)) == m.num_samples == 24
        assert storage.filesystem("s3").list_multipart_uploads(sidecars.bucket) == []
        assert not [f for f in _staging_leftovers() if f".{p.pid if False else ''}" and not _alive_owner(f)]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _alive_owner(f: Path) -> bool:
    try:
        os.kill(int(f.name.split(".")[-3]), 0)
        return True
    except (ProcessLookupError, ValueError):
        return False


def _write_wds(synth_dir: Path, folder: Path) -> list[str]:
    """The imagenet-1k-wds layout: jpg+cls per sample, written with webdataset's own TarWriter."""
    import webdataset as wds
    classes = sorted(d.name for d in synth_dir.iterdir() if d.is_dir())
    files = [(c, f) for c in classes for f in sorted((synth_dir / c).iterdir())]
    folder.mkdir(parents=True)
    keys = []
    for t in range(2):
        with wds.TarWriter(str(folder / f"imagenet1k-train-{t:04d}.tar")) as w:
            for c, f in files[t::2]:
                key = f"{c}_{f.stem}"
                w.write({"__key__": key, "jpg": f.read_bytes(), "cls": classes.index(c)})
                keys.append(key)
    return keys


@pytest.mark.slow
def test_extract_from_webdataset_tars_on_s3(synth_dir, s3_bucket, tmp_path):
    """WebDataset jpg+cls tars in a bucket, named by a brace pattern: every sample once, labels from cls."""
    keys = _write_wds(synth_dir, tmp_path / "wds")
    _upload(tmp_path / "wds", f"{s3_bucket}/wds")
    out = f"{s3_bucket}/wdsfeats"
    src = f"{s3_bucket}/wds/imagenet1k-train-{{0000..0001}}.tar"
    p = run_module("pipeline", "extract", "--source", src, "--out", out, *TINY_ARGS, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    m = load_manifest(out, verify=True)
    got = {s["__key__"]: s["cls"] for sh in m.shard_paths() for s in iter_shard(sh)}
    assert sorted(got) == sorted(k.replace(".", "_") for k in keys) and m.preprocess["source"] == "webdataset"
    assert {k: v for k, v in got.items()} == {k: sorted({k.split('_')[0] for k in keys}).index(k.split('_')[0])
                                              for k in got}
