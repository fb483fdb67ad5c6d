"""The contract: manifest validation, deterministic shards, atomic writes, safe reading."""
import errno
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import make_features_manifest
from common import UserError, run_cli
from manifests import atomic_open, index_shard, iter_shard, load_manifest, read_member, write_shard
from manifests.io import TMP_MARK
from manifests.schema import safe_relpath


def _edit(root: Path, fn):
    p = root / "manifest.json"
    raw = json.loads(p.read_text())
    fn(raw)
    p.write_text(json.dumps(raw))


def test_roundtrip_and_verify(tmp_path):
    m = make_features_manifest(tmp_path, num=20, shard_size=8, encoders={"tiny-dinov2": 16, "tiny-siglip": 8})
    got = load_manifest(tmp_path, kind="features", verify=True)
    assert got.num_samples == 20 and [s.nsamples for s in got.shardlist] == [8, 8, 4]
    assert got.encoder_fields() == ["tiny-dinov2", "tiny-siglip"]
    assert got.field("tiny-dinov2", shape=[256, 16], dtype="float16")["codec"] == "patch-tokens"
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["wids_version"] == 1 and raw["shardlist"][0]["url"] == "shards/train-000000.tar"
    samples = [s for p in got.shard_paths() for s in iter_shard(p)]
    assert [s["__key__"] for s in samples] == [f"img{i:05d}" for i in range(20)]
    assert samples[3]["latent.npy"].shape == (8, 32, 32) and samples[3]["cls"] == 3
    assert m.to_json() == raw


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r["repa"].update(schema=99), "schema version 99"),
    (lambda r: r.pop("repa"), "'repa' section"),
    (lambda r: r["repa"].update(kind="weird"), "'repa.kind'"),
    (lambda r: r["shardlist"][0].update(url="../x.tar"), "leaves the manifest's folder"),
    (lambda r: r["shardlist"][0].update(url="/etc/passwd"), "absolute path"),
    (lambda r: r["shardlist"][1].update(url="shards/missing.tar"), "shards/missing.tar"),
    (lambda r: r["repa"].update(num_samples=5), "num_samples"),
    (lambda r: r["shardlist"][0].update(bytes=12), "truncated or replaced"),
])
def test_bad_manifests_name_the_culprit(tmp_path, edit, needle):
    make_features_manifest(tmp_path, num=10, shard_size=5)
    _edit(tmp_path, edit)
    with pytest.raises(UserError, match=None) as e:
        load_manifest(tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_not_json_and_missing(tmp_path):
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        load_manifest(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_manifest(tmp_path / "nowhere")


def test_field_checks(tmp_path):
    m = make_features_manifest(tmp_path, num=4, encoders={"tiny-dinov2": 16})
    with pytest.raises(UserError, match=r"field 'tiny-dinov2' has shape \[256, 16\], model expects \[256, 768\]"):
        m.field("tiny-dinov2", shape=[256, 768])
    with pytest.raises(UserError, match="has no field 'dinov2-vit-b'"):
        m.field("dinov2-vit-b")
    assert m.field("latent", shape=[8, None, None])["dtype"] == "float32"


def test_verify_detects_corruption(tmp_path):
    m = make_features_manifest(tmp_path, num=10, shard_size=5)
    p = m.shard_paths()[1]
    data = bytearray(p.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes: only sha256 can tell
    p.write_bytes(bytes(data))
    load_manifest(tmp_path)  # size check passes
    with pytest.raises(UserError, match="train-000001.tar' fails sha256"):
        load_manifest(tmp_path, verify=True)


def test_shards_are_byte_deterministic_and_indexed(tmp_path):
    samples = [{"__key__": f"k{i}", "cls": i, "latent.npy": np.full((2, 3), i, np.float32), "json": {"i": i}}
               for i in range(5)]
    a, b = write_shard(tmp_path / "a.tar", samples), write_shard(tmp_path / "b.tar", samples)
    assert a.sha256 == b.sha256 and a.path.read_bytes() == b.path.read_bytes()
    assert a.index == index_shard(a.path)
    with open(a.path, "rb") as f:
        off, size = a.index["k3"]["latent.npy"]
        arr = np.load(io.BytesIO(read_member(f, off, size)), allow_pickle=False)
    assert (arr == 3).all()
    with tarfile.open(a.path) as t:
        assert {ti.mtime for ti in t} == {0}


def test_bad_keys_and_unsafe_members(tmp_path):
    with pytest.raises(UserError, match="invalid sample key"):
        write_shard(tmp_path / "x.tar", [{"__key__": "a.b", "cls": 1}])
    assert not list(tmp_path.iterdir())  # nothing partial left behind
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        ti = tarfile.TarInfo("../../etc/k.cls")
        ti.size = 1
        t.addfile(ti, io.BytesIO(b"1"))
    with pytest.raises(UserError, match="unsafe member name"):
        list(iter_shard(evil))
    with pytest.raises(UserError, match="unsafe member name"):
        index_shard(evil)


def test_pickled_npy_is_refused(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    write_shard(tmp_path / "p.tar", [{"__key__": "k", "evil.npy": buf.getvalue()}])
    with pytest.raises(UserError, match="not a plain .npy"):
        list(iter_shard(tmp_path / "p.tar"))


def test_safe_relpath():
    assert safe_relpath("shards/a.tar", "t") == "shards/a.tar"
    for bad in ("../a.tar", "shards/../../a.tar", "/abs.tar", "C:/x.tar", ""):
        with pytest.raises(UserError):
            safe_relpath(bad, "t")


def test_atomic_open_enospc_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out" / "file.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(UserError, match=r"cannot write .*file.bin: No space left on device"):
        with atomic_open(target) as f:
            f.write(b"new partial")
            monkeypatch.setattr(os, "fsync", full)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"  # the old file is intact
    assert not [p for p in target.parent.iterdir() if p.name.startswith(TMP_MARK)]


def test_run_cli_exit_codes(capsys):
    def user(argv):
        raise UserError("manifest field 'x' is wrong")

    def bug(argv):
        raise RuntimeError("boom")
    assert run_cli(user, []) == 2
    err = capsys.readouterr().err
    assert err == "error: manifest field 'x' is wrong\n"
    assert run_cli(bug, []) == 1
    assert "Traceback" in capsys.readouterr().err
    assert run_cli(lambda argv: 0, ["--debug"]) == 0


def test_real_disk_full_at_the_manifest_write(small_disk):
    """Rewriting a manifest on a real full tmpfs: one-line error naming it and the free space; the old one intact."""
    from helpers import fill_disk, make_features_manifest
    from common import UserError
    from manifests import write_manifest
    m = make_features_manifest(small_disk / "set", num=4, shard_size=2, latent_shape=(8, 8, 8), tokens=16,
                               encoders={"tiny-dinov2": 4})
    before = (small_disk / "set" / "manifest.json").read_bytes()
    fill_disk(small_disk)
    m.name = "renamed"
    with pytest.raises(UserError) as e:
        write_manifest(m)
    msg = str(e.value)
    assert "\n" not in msg and str(small_disk / "set" / "manifest.json") in msg and "No space left on device" in msg
    assert "B free)" in msg, msg
    assert (small_disk / "set" / "manifest.json").read_bytes() == before
    assert not [p for p in (small_disk / "set").rglob(".tmp-*")]
