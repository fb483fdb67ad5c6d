"""End to end with real processes: kill-and-resume with SIGKILL, a full disk in an actor, truncated shards
(a job on a `ray start` cluster: test_cluster_512.py)."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, assert_user_error, run_module, run_until_killed
from manifests import iter_shard, load_manifest, sha256_file

# The exact arguments of conftest's `tiny_features`: its uninterrupted run is the reference for byte identity.
TINY_ARGS = ["--vae", "tiny-vae", "--encoders", "tiny-dinov2,tiny-siglip", "--shard-size", "8", "--batch-size", "8"]


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def _tmp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def _sidecars(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "shards").glob("train-*.json"))}


def _check_sidecars_describe_whole_tars(out: Path) -> None:
    """The exactly-once invariant after any kill: every sidecar describes a whole tar, byte for byte."""
    for name, side in _sidecars(out).items():
        tar = out / "shards" / f"{name}.tar"
        assert tar.stat().st_size == side["bytes"] and sha256_file(tar) == side["sha256"], name


@pytest.mark.slow
def test_sigkill_at_each_write_point_then_resume_is_byte_identical(synth_dir, tiny_features, tmp_path):
    """SIGKILL the whole job (driver, Ray, actors) at each named write point, re-running after each.

    1. one actor (two shards in flight), the 2nd tar written but not renamed; 2. two actors writing concurrently, a tar renamed but its
    sidecar not written; a finished shard then truncated on disk; 3. one actor, every sidecar written but not the
    manifest. The last re-run ends byte-identical to the uninterrupted run, with a verifying manifest.
    """
    out, ray_tmp = tmp_path / "out", Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    cmd = [sys.executable, "-m", "pipeline", "extract", "--source", str(synth_dir), "--out", str(out), *TINY_ARGS]
    two = ["--cpu-actors", "2", "--num-cpus", "4"]  # 2 actors + decode tasks need 4 logical CPUs
    env = {"RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    reference = _tars(tiny_features)
    assert len(reference) == 3
    try:
        # 1. The 2nd tar is whole in its tmp file: it is not a shard yet. The actor runs two shards at once (one
        # encodes while the other's writer finishes), so another may be in its tmp file, or already renamed.
        run_until_killed(cmd, "tar-before-rename:2", tmp_path / "k1.log", env=env, marker=str(ray_tmp))
        tmps = [p for p in _tmp_files(out) if p.name.startswith(".tmp-train-")]
        assert 1 <= len(tmps) <= 2 and max(t.stat().st_size for t in tmps) > 0, _tmp_files(out)  # one just opened
        # The two shards that reached the kill point, plus at most the next one being encoded (its tmp just opened).
        assert 2 <= len(tmps) + len(_tars(out)) <= 3, (tmps, list(_tars(out)))
        assert set(_sidecars(out)) <= {t[:-4] for t in _tars(out)} and not (out / "manifest.json").exists()
        _check_sidecars_describe_whole_tars(out)
        # 2. Two concurrent writers: the first tar to reach its sidecar dies with the job, once the other writer has
        # finished its shard (`@shard-finished`), whichever order their writes interleave in.
        run_until_killed(cmd + two, "tar-before-sidecar@shard-finished", tmp_path / "k2.log", env=env,
                         marker=str(ray_tmp))
        orphans = set(_tars(out)) - {f"{n}.tar" for n in _sidecars(out)}
        assert len(orphans) >= 1 and _sidecars(out), (orphans, _sidecars(out))
        assert not (out / "manifest.json").exists()
        _check_sidecars_describe_whole_tars(out)
        done = next(iter(_sidecars(out)))  # a finished shard, truncated on disk: must be noticed and rebuilt
        victim = out / "shards" / f"{done}.tar"
        victim.write_bytes(victim.read_bytes()[:5000])
        # 3. Every shard finished, the manifest not written: readers see no data set yet.
        run_until_killed(cmd, "manifest-before-write", tmp_path / "k3.log", env=env, marker=str(ray_tmp))
        assert len(_sidecars(out)) == 3 and not (out / "manifest.json").exists()
        _check_sidecars_describe_whole_tars(out)
        assert _tars(out) == reference  # the truncated and the orphaned shards were rebuilt byte for byte
        p = run_module("pipeline", "extract", "--source", str(synth_dir), "--out", str(out), *TINY_ARGS,
                       "--verify", env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "3 finished, 0 to do" in p.stderr  # only the manifest was left to write
        assert _tars(out) == reference and not _tmp_files(out)
        m = load_manifest(out, verify=True)
        keys = [s["__key__"] for sh in m.shard_paths() for s in iter_shard(sh, decode=False)]
        assert len(keys) == len(set(keys)) == m.num_samples == 24
        assert m.shardlist == load_manifest(tiny_features).shardlist
        assert run_module("pipeline", "verify", str(out)).returncode == 0
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_real_disk_full_in_an_actor_is_one_line_exit_2(synth_dir, tmp_path):
    """`extract` of 3 shards onto a 1.2 MB tmpfs: a shard hits ENOSPC inside the Ray actor before all fit.
    The driver exits 2 with one line naming --out and the free space (not a Ray traceback); each finished shard
    is whole with its sidecar, nothing else is visible, and there is no manifest."""
    from helpers import mount_tmpfs
    disk, ray_tmp = tmp_path / "disk", Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # short: socket paths
    unmount = mount_tmpfs(disk, "1200k")
    try:
        out = disk / "out"
        p = run_module("pipeline", "extract", "--source", str(synth_dir), "--out", str(out), *TINY_ARGS,
                       env={"RAY_TMPDIR": str(ray_tmp)}, timeout=300)
        assert_user_error(p, str(out), "No space left on device", "B free)")
        assert "RayTaskError" not in p.stderr
        assert not (out / "manifest.json").exists()
        visible = sorted(x.name for x in (out / "shards").iterdir() if not x.name.startswith(".tmp-"))
        stems = sorted({name.rsplit(".", 1)[0] for name in visible})
        assert len(stems) < 3 and len(visible) == 2 * len(stems), visible  # finished shards only: tar + sidecar
        for stem in stems:
            side = json.loads((out / "shards" / f"{stem}.json").read_text())
            assert sha256_file(out / "shards" / f"{stem}.tar") == side["sha256"]
    finally:
        unmount()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_rerun_of_finished_output_does_no_work(tiny_features, synth_dir, tmp_path):
    """All shards finished: a re-run only re-assembles the manifest (no Ray), to the same shard list."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_features, out)
    (out / "shards" / ".tmp-train-000009.tar.123.abcd").write_bytes(b"half")  # a killed writer's leftover
    before = json.loads((out / "manifest.json").read_text())
    p = run_module("pipeline", "extract", "--source", str(synth_dir), "--out", str(out), *TINY_ARGS, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "3 finished, 0 to do" in p.stderr and "removed 1 half-written" in p.stderr
    assert json.loads((out / "manifest.json").read_text())["shardlist"] == before["shardlist"]
    assert not _tmp_files(out)
    # Different settings in the same folder are refused rather than mixed.
    p = run_module("pipeline", "extract", "--source", str(synth_dir), "--out", str(out), "--vae", "tiny-vae",
                   "--encoders", "tiny-dinov2", "--shard-size", "8", "--batch-size", "8", timeout=120)
    assert_user_error(p, "different extract")
    # A shard truncated on disk is named by `verify` (size check first, then sha256 of a same-size corruption).
    victim = out / "shards" / "train-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[:5000])
    assert_user_error(run_module("pipeline", "verify", str(out)), "train-000001.tar")
    victim.write_bytes(data[:-1] + b"x")
    assert_user_error(run_module("pipeline", "verify", str(out)), "train-000001.tar", "sha256")


def test_tiny_features_decode_back(tiny_features):
    """Every sample decodes with the manifest's shapes and dtypes; latents hold mean then a positive std."""
    m = load_manifest(tiny_features, kind="features", verify=True)
    assert m.fields["latent"]["shape"] == [8, 32, 32] and m.fields["latent"]["vae"]["pretrained"] is False
    assert m.fields["tiny-dinov2"]["shape"] == [256, 64] and m.fields["tiny-dinov2"]["dtype"] == "int8"  # default
    assert m.classes == [f"n{c:08d}" for c in range(4)] and m.extra["stats"]["bytes_per_sample"] > 0
    n = 0
    for shard in m.shard_paths():
        for s in iter_shard(shard):
            for f, spec in m.fields.items():
                a = s[f"{f}.npy"]
                codec = spec.get("token_codec", {})  # int8 tokens come with one float16 scale per token
                assert list(a.shape) == spec["shape"] and a.dtype == np.dtype(codec.get("storage", spec["dtype"]))
                if "scale" in codec:
                    sc = s[f"{f}.scale.npy"]
                    assert sc.shape == (spec["shape"][0],) and sc.dtype == np.float16 and np.isfinite(sc).all()
            assert (s["latent.npy"][4:] > 0).all() and np.isfinite(s["latent.npy"]).all()
            assert s["cls"] == int(s["__key__"].split("_")[0][1:]) and len(s["json"]["size"]) == 2
            n += 1
    assert n == m.num_samples == 24
