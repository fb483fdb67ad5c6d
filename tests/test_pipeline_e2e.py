"""End to end with real processes: kill-and-resume with SIGKILL, truncated shards, a real Ray cluster job."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, assert_user_error, run_module, run_until_killed
from manifests import iter_shard, load_manifest, sha256_file

# The exact arguments of conftest's `tiny_features`: its uninterrupted run is the reference for byte identity.
TINY_ARGS = ["--vae", "tiny-vae", "--encoders", "tiny-dinov2,tiny-siglip", "--shard-size", "8", "--batch-size", "8"]


def _env(ray_tmp: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}


def _kill_group(pgid: int) -> None:
    """Stop what is left of a process group that this test started (Ray helpers of a killed driver)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
        # 2. Two concurrent writers; the first tar to reach its sidecar dies with the job.
        run_until_killed(cmd + two, "tar-before-sidecar", tmp_path / "k2.log", env=env, marker=str(ray_tmp))
        orphans = set(_tars(out)) - {f"{n}.tar" for n in _sidecars(out)}
        assert len(orphans) >= 1 and not (out / "manifest.json").exists(), (orphans, _sidecars(out))
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


# ------------------------------------------------------------------------------------- a real Ray cluster
def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _plant_bad_files(src: Path) -> dict[str, str]:
    """Bad inputs next to good ones; returns key -> expected reason fragment."""
    cls = sorted(d for d in src.iterdir() if d.is_dir())
    good = next(cls[0].iterdir()).read_bytes()
    (cls[0] / "zero_bytes.JPEG").write_bytes(b"")
    (cls[1] / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (cls[2] / "notes.JPEG").write_text("this is not an image\n")
    (cls[3] / "x_dangling.JPEG").symlink_to(src / "does-not-exist.JPEG")  # unreadable (root can read 0o000 files)
    return {"zero_bytes": "zero-byte", "truncated": "truncated", "notes": "not an image", "x_dangling": "unreadable"}


def _pids_using(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_ray_cluster_job_submit(synth_dir, tiny_features, tmp_path):
    """`ray start --head` on free ports, `ray job submit --working-dir .` runs extract --hflip; bad inputs skipped."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: unix socket paths are limited to ~107 chars
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(synth_dir, src)
    bad = _plant_bad_files(src)
    gcs, dash, client, agent = _free_ports(4)
    env = {**_env(temp), "RAY_AUTH_MODE": "token"}  # Ray's default for new clusters; the CLI then sends the token
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
                             f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}", "--num-cpus=2",
                             "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:
            assert head.poll() is None, head.stdout.read().decode()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                break
            except OSError:
                assert time.time() < deadline, "Ray dashboard did not come up"
                time.sleep(0.5)
        excludes = json.dumps({"excludes": [".git", ".venv", "demo", "*.egg-info", ".pytest_cache"]})
        sub = subprocess.run([str(ray_bin), "job", "submit", "--address", url, "--working-dir", ".",
                              "--runtime-env-json", excludes, "--", sys.executable, "-m", "pipeline", "extract",
                              "--source", str(src), "--out", str(out), *TINY_ARGS, "--hflip"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-4000:]
        assert "succeeded" in (sub.stdout + sub.stderr).lower()
    finally:
        head.send_signal(signal.SIGTERM)  # stop the head by its PID; --block tears down its children
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        _kill_group(head.pid)
        for pid in _pids_using(str(temp)):  # stragglers of this cluster only (they carry its temp dir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
    m = load_manifest(out, kind="features", verify=True)
    assert m.num_samples == 24 and not _tmp_files(out)
    reasons = {s["key"]: s["reason"] for s in m.skipped}
    assert set(reasons) == set(bad), reasons
    for key, why in bad.items():
        assert why in reasons[key], (key, reasons[key])
    # Same images and models as the local run: the same arrays (up to batch-composition rounding, as the bad
    # files shift which images share a shard).
    local = {s["__key__"]: s for sh in load_manifest(tiny_features).shard_paths() for s in iter_shard(sh)}
    assert m.preprocess["hflip"] is True
    for sh in m.shard_paths():
        for s in iter_shard(sh):
            assert s["cls"] == local[s["__key__"]]["cls"]
            for f, spec in m.fields.items():
                flip = s[f"{f}.flip.npy"]  # the flipped twin: same shape, different values
                assert list(flip.shape) == spec["shape"] and not np.array_equal(flip, s[f"{f}.npy"])
                np.testing.assert_allclose(s[f"{f}.npy"].astype(np.float32),
                                           local[s["__key__"]][f"{f}.npy"].astype(np.float32), rtol=2e-3, atol=2e-3)
    # The flipped latent is the VAE moments of the mirrored ADM crop of the source image.
    import torch
    from PIL import Image
    from pipeline.encoders import load_vae, vae_moments
    from pipeline.transforms import adm_center_crop
    first = next(iter_shard(m.shard_paths()[0]))
    crop = np.asarray(adm_center_crop(Image.open(src / first["json"]["source"]), 256))[:, ::-1].copy()
    want = vae_moments(load_vae("tiny-vae"), torch.from_numpy(crop)[None])[0].numpy()
    np.testing.assert_allclose(first["latent.flip.npy"], want, rtol=1e-2, atol=5e-3)  # batch 1 vs 8 rounding
    assert np.abs(first["latent.flip.npy"] - first["latent.npy"]).max() > 0.05  # and not the unflipped one
