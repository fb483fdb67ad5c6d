"""Real faults (issue 26): transient S3 errors injected by tests/fault_proxy.py, permanent failures, two jobs on one
output (the lease), hostile object keys, and an S3 run folder that behaves like a local one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_user_error, make_features_manifest, run_module
from common import UserError
from manifests import lease, load_manifest, retry, storage
from manifests.object_checks import abort_uploads


def test_permanent_failure_is_one_line_exit_2(s3_server, s3_bucket):
    """A store that answers every request with 503 SlowDown: the policy retries (logged), then gives up with one
    line naming the URL, exit 2. (Planted bug it fails on: `transient()` returning False -> no retry, no 'gave up'.)"""
    from fault_proxy import FaultProxy
    make_features_manifest(f"{s3_bucket}/feats", num=8, shard_size=8)
    proxy = FaultProxy(s3_server.endpoint, rate=1.0, seed=0, kinds=("slowdown",))
    try:
        p = run_module("pipeline", "verify", f"{s3_bucket}/feats",
                       env={"AWS_ENDPOINT_URL": proxy.endpoint, "REPA_STORAGE_RETRIES": "3",
                            "REPA_STORAGE_BACKOFF": "0.01"})
    finally:
        proxy.stop()
    assert_user_error(p, f"{s3_bucket}/feats", "gave up after 3 attempts")
    assert p.stderr.count("storage: retry") == 2 and proxy.stats["slowdown"] == 3


def test_not_found_is_not_retried(s3_bucket, monkeypatch):
    """404 is the user's to fix: one attempt, no retry logged."""
    before = retry.STATS["retries"]
    with pytest.raises(UserError, match="not found"):
        storage.path(f"{s3_bucket}/nothing.bin").read_bytes()
    assert retry.STATS["retries"] == before


def _foreign_lease(out, *, host: str, pid: int, expires_in: float) -> None:
    now = time.time()
    rec = {"holder": f"{host}:{pid}", "host": host, "pid": pid, "what": "pipeline extract", "token": "other",
           "started": now - 5, "heartbeat": now, "expires": now + expires_in}
    storage.path(out).joinpath(lease.LEASE_NAME).write_bytes(json.dumps(rec).encode())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lease_one_writer_per_output(where, s3_bucket, tmp_path):
    """A live holder refuses a second job with one line naming it and the expiry; a dead holder (same machine,
    pid gone) or an expired one is taken over. (Planted bug: `stale()` always True -> the second job ran.)"""
    out = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    storage.path(out).mkdir(parents=True, exist_ok=True)
    _foreign_lease(out, host="other-host", pid=1, expires_in=300)
    with pytest.raises(UserError, match=r"in use by another job .*other-host:1.*lease expires at"):
        lease.acquire(out, "pipeline extract")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _foreign_lease(out, host=socket.gethostname(), pid=int(dead.stdout), expires_in=300)
    with lease.acquire(out, "pipeline extract") as held:  # its holder died: a re-run proceeds at once
        rec = json.loads(storage.path(out).joinpath(lease.LEASE_NAME).read_bytes())
        assert rec["token"] == held.record["token"]
    assert not storage.path(out).joinpath(lease.LEASE_NAME).exists()  # released
    _foreign_lease(out, host="other-host", pid=1, expires_in=-1)  # expired elsewhere
    lease.acquire(out, "x").release()


def test_second_extract_on_a_held_out_is_refused(synth_dir, tmp_path):
    """`pipeline extract` on an --out another job holds: one line naming the holder, exit 2, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    _foreign_lease(out, host="other-host", pid=4242, expires_in=300)
    p = run_module("pipeline", "extract", "--source", str(synth_dir), "--out", str(out), "--vae", "tiny-vae",
                   "--encoders", "tiny-dinov2", "--limit", "4")
    assert_user_error(p, "other-host:4242", "expires at")
    assert not (out / "shards").exists() or not any((out / "shards").iterdir())


def test_cleanup_touches_only_stale_leftovers(s3_bucket, tmp_path, monkeypatch):
    """Local tmp files of a live writer survive clean-up, a dead one's go; multipart uploads are aborted only under
    the prefix by whole path segments ('feats' never hits 'feats-512') and only if begun before the lease.
    (Planted bugs: `under()` as a plain startswith; clean_partial_writes ignoring the pid.)"""
    folder = tmp_path / "shards"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = folder / f".tmp-train-000000.tar.{sleeper.pid}.0badc0de"
    gone = folder / f".tmp-train-000001.tar.{int(dead.stdout)}.0badc0de"
    live.write_bytes(b"x")
    gone.write_bytes(b"x")
    try:
        assert storage.path(folder).clean_partial_writes() == 1 and live.exists() and not gone.exists()
    finally:
        sleeper.kill()
    fs, bucket = storage.filesystem("s3"), s3_bucket[len("s3://"):]
    for key in ("feats/shards/a.tar", "feats-512/shards/a.tar"):
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    # moto dates every upload 2010-11-10: a lease taken in 2000 did not see it begin, so it is not ours to abort.
    assert abort_uploads(storage.path(f"{s3_bucket}/feats"), before=946684800.0) == 0
    assert abort_uploads(storage.path(f"{s3_bucket}/feats"), before=time.time()) == 1
    assert [u["Key"] for u in fs.list_multipart_uploads(bucket)] == ["feats-512/shards/a.tar"]


def test_hostile_keys_are_refused_and_write_nothing(s3_server, s3_bucket, tmp_path, monkeypatch):
    """An object key that climbs out of the local mirror (`checkpoints/9999999/../../../x.pt`): pull, localize and
    sync_down give one line naming it and write nothing. (Planted bug: `confine()` returning root/rel unchecked.)"""
    import boto3

    from manifests.remote_inputs import localize, sync_down
    from trainer.loop import remote_run
    monkeypatch.setenv("REPA_REMOTE_CACHE", str(tmp_path / "cache"))
    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    for key in ("run/checkpoints/0000002.pt", "run/checkpoints/9999999/../../../x.pt", "run/config.json"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    assert "run/checkpoints/9999999/../../../x.pt" in [o["Key"] for o in client.list_objects_v2(
        Bucket=bucket)["Contents"]]
    before = sorted(p for p in tmp_path.rglob("*"))
    for fn in (lambda: remote_run.pull(f"{s3_bucket}/run"), lambda: localize(f"{s3_bucket}/run", "samples"),
               lambda: sync_down(f"{s3_bucket}/run", ".pt")):
        with pytest.raises(UserError, match=r"refusing object key .*\.\./\.\./\.\./x\.pt"):
            fn()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p not in before]
    assert not written, written
    assert not list(tmp_path.rglob("x.pt"))


def _ckpt(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "model": {"w": torch.full((4,), float(step))}}, path)


def test_s3_run_folder_parity(s3_bucket, tmp_path, monkeypatch):
    """push/pull of an S3 run folder: tb/, samples/, DONE and abandoned/ are mirrored, retention prunes the
    bucket, an abandoned checkpoint never comes back, a same-size change is uploaded (checksums, not sizes), a
    shorter stats.jsonl never replaces a longer one without keeping it, and pull walks back past an unreadable
    newest checkpoint. (Planted bugs: `same_bytes` comparing sizes only; pull taking the newest unchecked.)"""
    from trainer.loop import remote_run
    url = f"{s3_bucket}/run"
    local = tmp_path / "run"
    for s in (2, 4, 6):
        _ckpt(local / "checkpoints" / f"{s:07d}.pt", s)
    (local / "config.json").write_text(json.dumps({"train": {"keep_last": 2, "keep_every": 0}}))
    (local / "stats.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)))
    (local / "tb").mkdir()
    (local / "tb" / "events.out").write_bytes(b"tb")
    (local / "samples").mkdir()
    (local / "samples" / "0000006.png").write_bytes(b"png")
    (local / "DONE").write_text("{}")
    remote_run.push(local, url)
    names = set(storage.path(url).listing())
    assert {"tb/events.out", "samples/0000006.png", "DONE", "checkpoints/0000006.pt"} <= names
    assert "checkpoints/0000002.pt" not in names  # --keep-last 2: the bucket prunes as the folder does
    # --resume-from 4: step 6 moves to abandoned/ locally; the bucket follows and step 6 never comes back.
    (local / "checkpoints" / "abandoned").mkdir()
    os.replace(local / "checkpoints" / "0000006.pt", local / "checkpoints" / "abandoned" / "0000006.pt")
    (local / "stats.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 5)))
    cfg = (local / "config.json").read_bytes()
    (local / "config.json").write_bytes(cfg.replace(b"2", b"3"))  # same size, other bytes
    remote_run.push(local, url)
    names = set(storage.path(url).listing())
    assert "checkpoints/0000006.pt" not in names and "checkpoints/abandoned/0000006.pt" in names
    assert storage.path(f"{url}/config.json").read_bytes() == cfg.replace(b"2", b"3")
    kept = [n for n in names if n.startswith("abandoned/stats")]
    assert len(kept) == 1 and storage.path(f"{url}/{kept[0]}").read_text().count("\n") == 6
    # A fresh machine: the newest checkpoint in the bucket is unreadable -> pull walks back to step 4.
    monkeypatch.setenv("REPA_REMOTE_CACHE", str(tmp_path / "m2"))
    _ckpt(tmp_path / "x.pt", 8)
    storage.path(f"{url}/checkpoints/0000008.pt").write_bytes((tmp_path / "x.pt").read_bytes()[:100])
    got = remote_run.pull(url)
    assert sorted(p.name for p in (got / "checkpoints").glob("*.pt")) == ["0000004.pt"]
    assert (got / "stats.jsonl").read_text().count("\n") == 4


@pytest.mark.slow
def test_chain_through_faulty_s3_is_byte_identical(synth_dir, tiny_features, s3_bucket, faulty_s3, tmp_path,
                                                   monkeypatch, capsys):
    """Extract (Ray, subprocess), train (ranged GETs + --cache-dir, run folder on S3), sample and evaluate, all
    through the proxy at 5 % injected faults (503 SlowDown, 500, resets, slow responses): every output equals the
    clean local run's, nothing skipped. The figures go to docs/reliability.md.
    (Planted bug it fails on: `retry.transient()` returning False, i.e. no retries: the first injected 503 ends
    the extract.)"""
    from common import run_cli
    from evaluation.__main__ import main as eval_main
    from trainer.__main__ import main as trainer_main
    from trainer.sampling.job import main as sample_main
    torch.set_num_threads(1)
    monkeypatch.setenv("REPA_REMOTE_CACHE", str(tmp_path / "mirror"))
    src, feats = f"{s3_bucket}/src", f"{s3_bucket}/feats"
    for p in sorted(synth_dir.rglob("*")):
        if p.is_file():
            storage.path(src).joinpath(p.relative_to(synth_dir).as_posix()).write_bytes(p.read_bytes())
    ex = run_module("pipeline", "extract", "--source", src, "--out", feats, "--vae", "tiny-vae", "--encoders",
                    "tiny-dinov2,tiny-siglip", "--shard-size", "8", "--batch-size", "8", timeout=600)
    assert ex.returncode == 0, ex.stderr[-3000:]
    m, ref = load_manifest(feats, verify=True), load_manifest(tiny_features)
    assert m.shardlist == ref.shardlist and m.skipped == ref.skipped == []  # byte-identical shards, none skipped
    retries = ex.stderr.count("storage: retry")

    def train(manifest, run, *extra):
        return ["train", "--manifest", str(manifest), "--run-dir", str(run), "--model", "SiT-Debug/2",
                "--batch-size", "4", "--steps", "4", "--ckpt-every", "2", "--precision", "fp32",
                "--num-workers", "0", *extra]
    assert run_cli(trainer_main, train(tiny_features, tmp_path / "clean")) == 0
    cache = tmp_path / "cache"
    assert run_cli(trainer_main, train(feats, f"{s3_bucket}/run", "--cache-dir", str(cache))) == 0, \
        capsys.readouterr().err
    a = torch.load(tmp_path / "clean" / "checkpoints" / "0000004.pt", weights_only=True)["model"]
    b_path = remote_run_file(f"{s3_bucket}/run/checkpoints/0000004.pt", tmp_path / "b.pt")
    b = torch.load(b_path, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    sample = ["--steps", "2", "--shard-size", "4", "--num-samples", "8", "--batch-size", "8", "--npz"]
    assert run_cli(sample_main, ["--ckpt", str(tmp_path / "clean"), "--out", str(tmp_path / "s_clean"), *sample]) == 0
    assert run_cli(sample_main, ["--ckpt", f"{s3_bucket}/run", "--out", f"{s3_bucket}/samples", *sample]) == 0
    sm, sc = load_manifest(f"{s3_bucket}/samples", kind="samples", verify=True), \
        load_manifest(tmp_path / "s_clean", kind="samples")
    assert [e.sha256 for e in sm.shardlist] == [e.sha256 for e in sc.shardlist]
    ev = ["--inception-weights", "random:0", "--no-progress", "--batch-size", "4", "--num-workers", "1"]
    assert run_cli(eval_main, ["--samples", str(tmp_path / "s_clean"), "--reference",
                               str(tmp_path / "s_clean" / "samples.npz"), "--out", str(tmp_path / "r.json"),
                               "--no-cache", *ev]) == 0
    assert run_cli(eval_main, ["--samples", f"{s3_bucket}/samples", "--reference",
                               f"{s3_bucket}/samples/samples.npz", "--out", f"{s3_bucket}/r.json", "--no-cache",
                               *ev]) == 0
    clean = json.loads((tmp_path / "r.json").read_text())["metrics"]
    faulty = json.loads(storage.path(f"{s3_bucket}/r.json").read_text())["metrics"]
    assert faulty == clean
    retries += retry.STATS["retries"]
    print(f"\nfault figures: {faulty_s3.stats['requests']} requests, {faulty_s3.injected} faults injected "
          f"{ {k: faulty_s3.stats[k] for k in ('slowdown', 'internal', 'reset', 'slow')} }, {retries} retries "
          f"logged, outputs byte-identical", file=sys.__stderr__)
    assert faulty_s3.injected >= 10 and retries > 0


def remote_run_file(url: str, dest: Path) -> Path:
    dest.write_bytes(storage.path(url).read_bytes())
    return dest


def test_source_read_errors_skip_only_bad_images(tmp_path, monkeypatch):
    """decode_shard: a store error that outlived the retry policy fails the shard (a re-run redoes it); a dangling
    link is the image's own fault and is skipped with a reason. (Before: every read error was 'unreadable file' and
    skipped, so a throttled bucket lost images for good. Planted bug it fails on: `image_fault()` returning True.)"""
    import errno

    from pipeline import sources
    from pipeline.worker import decode_shard
    from pipeline.sources import Item
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    items = [Item(key="gone", label=0, source="a/gone.jpg", path=str(tmp_path / "gone.jpg"))]
    row = {"shard": 3, "resolution": 32, "items": json.dumps([it.to_dict() for it in items])}
    meta = json.loads(decode_shard(row)["meta"])
    assert [s["key"] for s in meta["skipped"]] == ["gone"] and "unreadable" in meta["skipped"][0]["reason"]
    throttled = UserError("cannot read s3://b/a/x.jpg: Please reduce your request rate. (gave up after 8 attempts)")
    throttled.__cause__ = OSError(errno.EBUSY, "Please reduce your request rate.")
    monkeypatch.setattr(sources.Item, "read", lambda self: (_ for _ in ()).throw(throttled))
    with pytest.raises(UserError, match="shard 3: cannot read a/gone.jpg"):
        decode_shard(row)
