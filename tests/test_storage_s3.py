"""The storage layer against a real S3 server (moto over HTTP, s3fs client): whole objects, verify, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helpers import assert_user_error, make_features_manifest, run_module
from common import UserError
from manifests import atomic_open, iter_shard, load_manifest, objects, storage


def test_manifest_roundtrip_on_s3_matches_local(s3_bucket, tmp_path):
    """The same shard set written to a folder and to a bucket: identical bytes, loads and verifies on both."""
    local = make_features_manifest(tmp_path / "feats", num=20, shard_size=8)
    remote = make_features_manifest(f"{s3_bucket}/feats", num=20, shard_size=8)
    assert isinstance(remote.root, storage.ObjectPath) and str(remote.path) == f"{s3_bucket}/feats/manifest.json"
    for a, b in zip(local.shard_paths(), remote.shard_paths()):
        assert a.read_bytes() == b.read_bytes()
    m = load_manifest(f"{s3_bucket}/feats", verify=True)  # the folder URL, like a local folder
    assert [s.sha256 for s in m.shardlist] == [s.sha256 for s in local.shardlist]
    got = [s for p in m.shard_paths() for s in iter_shard(p)]
    want = [s for p in local.shard_paths() for s in iter_shard(p)]
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want]
    np.testing.assert_array_equal(got[7]["latent.npy"], want[7]["latent.npy"])
    # file:// is a plain local path.
    assert load_manifest(f"file://{tmp_path / 'feats'}").num_samples == 20


def test_failed_write_leaves_no_object_and_aborts_multipart(s3_bucket, tmp_path, monkeypatch):
    """An error inside the writer, or mid-way through a multipart upload, never makes an object visible."""
    target = storage.path(f"{s3_bucket}/out/big.bin")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert not target.exists()
    monkeypatch.setattr(objects, "UPLOAD_BLOCK", 5 << 20)  # S3's smallest part: 3 parts for 12 MiB
    real_copy = objects.shutil.copyfileobj

    attempts = []

    def copy_two_parts_then_fail(src, dst, length):
        attempts.append(1)
        dst.write(src.read(2 * length))  # two parts go up (a multipart upload is open)...
        dst.flush()
        raise ConnectionResetError("network down mid-upload")  # ...then the link drops
    monkeypatch.setattr(objects.shutil, "copyfileobj", copy_two_parts_then_fail)
    # The policy is read at each call (the old RETRIES constant was bound at import, so patching it did nothing;
    # planted bug this catches: policy() ignoring REPA_STORAGE_RETRIES -> 8 attempts).
    monkeypatch.setenv("REPA_STORAGE_RETRIES", "2")
    monkeypatch.setenv("REPA_STORAGE_BACKOFF", "0.01")
    with pytest.raises(UserError, match="big.bin.*gave up after 2 attempts"):
        with atomic_open(target) as f:
            f.write(os.urandom(12 << 20))
    assert len(attempts) == 2 and not target.exists()  # a reset is transient: retried once, then one line
    bucket = target.bucket
    assert storage.filesystem("s3").list_multipart_uploads(bucket) == []  # aborted, not left to linger
    monkeypatch.setattr(objects.shutil, "copyfileobj", real_copy)
    data = os.urandom(12 << 20)
    with atomic_open(target) as f:  # the same write without the fault: one completed multipart upload
        f.write(data)
    assert target.read_bytes() == data


def test_killed_multipart_upload_is_aborted_by_the_next_writer(s3_bucket, tmp_path):
    """A writer SIGKILLed mid-way through a multipart upload (5 MiB parts via REPA_UPLOAD_BLOCK) leaves an unfinished
    upload, which the store lists; the next writer's clean-up aborts it, and only under its own prefix. (This is what
    the pipeline test's `list_multipart_uploads == []` could not see: its shards are single PUTs.)"""
    import subprocess
    import sys
    from manifests.io import remove_tmp_files
    code = f"""
import os, signal, shutil
from manifests import objects, storage
def two_parts_then_die(src, dst, length):
    dst.write(src.read(2 * length)); dst.flush(); os.kill(os.getpid(), signal.SIGKILL)
objects.shutil.copyfileobj = two_parts_then_die
with storage.path("{s3_bucket}/out/big.bin").atomic_file() as tmp:
    tmp.write_bytes(os.urandom(12 << 20))
"""
    for prefix in ("out", "out-512"):
        p = subprocess.run([sys.executable, "-c", code.replace("/out/", f"/{prefix}/")],
                           env={**os.environ, "REPA_UPLOAD_BLOCK": str(5 << 20)}, capture_output=True, text=True)
        assert p.returncode == -9, p.stderr[-2000:]
    fs, bucket = storage.filesystem("s3"), s3_bucket[len("s3://"):]
    assert sorted(u["Key"] for u in fs.list_multipart_uploads(bucket)) == ["out-512/big.bin", "out/big.bin"]
    assert remove_tmp_files(f"{s3_bucket}/out") >= 1
    assert [u["Key"] for u in fs.list_multipart_uploads(bucket)] == ["out-512/big.bin"]  # the sibling is not ours
    assert not storage.path(f"{s3_bucket}/out/big.bin").exists()


def test_bad_object_store_input_is_one_line_exit_2(s3_server, s3_bucket, tmp_path):
    """Missing bucket, missing object, denied access, truncated shard, wrong endpoint: one line naming the URL."""
    make_features_manifest(f"{s3_bucket}/feats", num=8, shard_size=8)
    missing_bucket = "s3://no-such-bucket-repa/feats"
    assert_user_error(run_module("pipeline", "verify", missing_bucket), "bucket not found", "s3://no-such-bucket-repa")
    assert_user_error(run_module("pipeline", "verify", f"{s3_bucket}/nothing"), f"{s3_bucket}/nothing")
    shard = storage.path(f"{s3_bucket}/feats/shards/train-000000.tar")
    data = shard.read_bytes()
    shard.write_bytes(data[:5000])  # truncated object
    assert_user_error(run_module("pipeline", "verify", f"{s3_bucket}/feats"), f"{s3_bucket}/feats/shards/train-000000.tar")
    shard.write_bytes(data)
    wrong = run_module("pipeline", "verify", f"{s3_bucket}/feats",
                       env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "REPA_STORAGE_RETRIES": "1"})
    assert_user_error(wrong, f"{s3_bucket}/feats")
    assert "testing" not in wrong.stderr  # never a credential in a message
    import boto3
    name = s3_bucket[len("s3://"):]
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:*",
                                                    "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}
    boto3.client("s3", endpoint_url=s3_server.endpoint).put_bucket_policy(Bucket=name, Policy=json.dumps(deny))
    assert_user_error(run_module("pipeline", "verify", f"{s3_bucket}/feats"), f"{s3_bucket}/feats", "denied")
