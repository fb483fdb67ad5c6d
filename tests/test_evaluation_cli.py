"""`python -m evaluation` end to end with random Inception weights on tiny image sets: formats, references,
the HDF5 cache (hit, SIGKILL mid-write, corrupt entries), ENOSPC and the bad-input matrix."""
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import filled_before, make_features_manifest, run_module, run_until_killed
from manifests import sha256_file

from eval_sets import N, RES, _tmp_files, evaluate, one_line_error, sets  # noqa: F401 (sets is a fixture)


@pytest.mark.slow
def test_cli_end_to_end_subprocess(sets, tmp_path):
    out = tmp_path / "report.json"
    p = run_module("evaluation", "--samples", str(sets.manifest), "--reference", str(sets.ref), "--out", str(out),
                   "--inception-weights", "random:0", "--cache-dir", str(sets.cache), "--batch-size", "4",
                   "--no-progress", timeout=300)
    assert p.returncode == 0, p.stderr
    header = p.stdout.splitlines()[0]
    for col in ("FID", "sFID", "IS", "Prec.", "Rec."):
        assert col in header
    assert "not comparable" in p.stdout
    rep = json.loads(out.read_text())
    assert set(rep["metrics"]) == {"fid", "sfid", "is", "precision", "recall"}
    assert all(np.isfinite(v) for v in rep["metrics"].values())
    assert rep["comparable"] is False and "not comparable" in rep["note"]
    assert rep["samples"]["count"] == N and rep["samples"]["kind"] == "samples-manifest"
    assert rep["samples"]["sha256"] == sha256_file(sets.manifest / "manifest.json")
    assert rep["reference"]["transform"] == f"adm-center-crop@{RES}" and rep["reference"]["count"] == N
    assert rep["inception"]["weights"] == "random:0" and rep["inception"]["sha256"] is None
    assert rep["settings"]["tf32"] is False and rep["settings"]["pr_dtype"] == "float32"
    assert rep["metrics"]["fid"] > 0 and 0 <= rep["metrics"]["precision"] <= 1


def test_sample_formats_give_identical_numbers(sets, tmp_path, capsys):
    reports = {}
    for name in ("manifest", "npz", "folder"):
        out = tmp_path / f"{name}.json"
        rc, stdout, err = evaluate(capsys, "--samples", str(getattr(sets, name)), "--reference", str(sets.ref),
                                   "--out", str(out), cache=sets.cache)
        assert rc == 0, err
        reports[name] = json.loads(out.read_text())
    m = reports["manifest"]["metrics"]
    for other in ("npz", "folder"):  # the same pixels; float32 kernels may round differently by memory layout
        assert reports[other]["metrics"] == pytest.approx(m, rel=1e-6)
    assert reports["npz"]["samples"]["kind"] == "npz" and reports["folder"]["samples"]["kind"] == "folder"


def test_num_samples_cuts_and_checks(sets, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(out),
                          "--num-samples", "4", cache=sets.cache)
    assert rc == 0, err
    assert json.loads(out.read_text())["samples"]["count"] == 4


# ---- HDF5 cache -----------------------------------------------------------------------------------------------

def test_cache_hit_skips_the_forward_pass(sets, tmp_path, capsys, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "r.json"
    args = ("--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(out))
    rc, _, err = evaluate(capsys, *args, cache=sets.cache)  # usually hits already: earlier tests filled it
    assert rc == 0, err
    first = json.loads(out.read_text())
    cache.mkdir()
    for entry in (first["samples"]["cache_path"], first["reference"]["cache_path"]):
        shutil.copy(entry, cache)

    from evaluation.inception import InceptionFeatures

    def no_forward(self, images):
        raise AssertionError("forward pass on a cache hit")
    monkeypatch.setattr(InceptionFeatures, "__call__", no_forward)
    rc, _, err = evaluate(capsys, *args, cache=cache)
    assert rc == 0, err
    second = json.loads(out.read_text())
    assert second["samples"]["cache"] == second["reference"]["cache"] == "hit"
    assert second["metrics"] == first["metrics"]
    assert second["timing"]["forward_s"] == 0


@pytest.mark.slow
def test_sigkill_while_writing_cache_is_rebuilt(sets, tmp_path, capsys):
    """SIGKILL at a named point (REPA_KILL_AT=eval-cache-batch:3: three batches are in the tmp cache file)."""
    cache, out = tmp_path / "cache", tmp_path / "r.json"
    big = np.random.default_rng(1).integers(0, 256, (12, RES, RES, 3), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", arr_0=big)
    args = ["--samples", str(tmp_path / "big.npz"), "--reference", str(tmp_path / "big.npz"), "--out", str(out)]
    run_until_killed([sys.executable, "-m", "evaluation", *args, "--inception-weights", "random:0", "--cache-dir",
                      str(cache), "--batch-size", "2", "--num-workers", "1", "--device", "cpu", "--no-progress"],
                     "eval-cache-batch:3", tmp_path / "kill.log", timeout=240)
    tmps = _tmp_files(cache)
    assert len(tmps) == 1 and not list(cache.glob("*.h5")), "only a tmp file may exist after the kill"
    with h5py.File(tmps[0], "r") as f:  # the killed writer's file: three batches in, never marked complete
        assert not bool(f.attrs["complete"]) and np.abs(f["pool"][:6]).sum() > 0 and "mu" not in f

    rc, _, err = evaluate(capsys, *args, cache=cache)
    assert rc == 0, err
    assert "removed incomplete cache file" in err
    rep = json.loads(out.read_text())
    assert rep["reference"]["cache"] == "miss" and rep["samples"]["cache"] == "hit"  # same input, same key
    assert not _tmp_files(cache) and len(list(cache.glob("*.h5"))) == 1
    with h5py.File(next(cache.glob("*.h5"))) as f:
        assert bool(f.attrs["complete"]) and f["pool"].shape == (12, 2048)
    assert rep["metrics"]["fid"] == pytest.approx(0.0, abs=1e-6)  # a set against itself


def test_incomplete_or_corrupt_cache_entry_is_rebuilt(sets, tmp_path, capsys):
    from evaluation.features import read_cache
    cache, out = tmp_path / "cache", tmp_path / "r.json"
    args = ("--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(out))
    assert evaluate(capsys, *args, cache=sets.cache)[0] == 0
    first = json.loads(out.read_text())
    cache.mkdir()
    entry = Path(shutil.copy(first["samples"]["cache_path"], cache))
    shutil.copy(first["reference"]["cache_path"], cache)
    key = entry.stem
    assert read_cache(entry, key) is not None

    def corrupt(name, how):
        bad = cache / f"{name}.h5"
        shutil.copy(entry, bad)
        how(bad)
        capsys.readouterr()
        assert read_cache(bad, key) is None and not bad.exists()  # refused and deleted
        return capsys.readouterr().err

    def unmark(p):  # as if the 'complete' mark was never written
        with h5py.File(p, "r+") as f:
            f.attrs["complete"] = False

    def flip(p):  # one changed value fails the checksum
        with h5py.File(p, "r+") as f:
            f["mu"][0] += 1.0
    assert "incomplete" in corrupt("unmarked", unmark)
    assert "checksum mismatch" in corrupt("flipped", flip)
    assert "unreadable" in corrupt("truncated", lambda p: p.write_bytes(entry.read_bytes()[: p.stat().st_size // 2]))

    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])  # the real entry, truncated: the job rebuilds it
    rc, _, err = evaluate(capsys, *args, cache=cache)
    assert rc == 0, err
    assert "rebuilding it" in err
    rep = json.loads(out.read_text())
    assert rep["samples"]["cache"] == "miss" and rep["reference"]["cache"] == "hit"
    assert rep["metrics"] == pytest.approx(first["metrics"], rel=1e-6)  # recomputed (thread counts may round)
    assert read_cache(entry, key) is not None


def test_disk_full_is_one_line_naming_the_path(sets, tmp_path, capsys, monkeypatch):
    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    cache, out = sets.cache, tmp_path / "r.json"
    assert evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(out),
                    cache=cache)[0] == 0  # fills the cache for this pair
    out.unlink()
    before = sorted(cache.iterdir())
    monkeypatch.setattr(os, "fsync", enospc)
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(out),
                          "--num-samples", "5", cache=cache)  # a new cache entry for 5 samples
    one_line_error(rc, err, "cannot write", str(cache), "No space left on device", "--no-cache")
    assert sorted(cache.iterdir()) == before  # neither a tmp nor a final entry
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(out),
                          cache=cache)  # cache hits: only the report write fails
    one_line_error(rc, err, str(out), "No space left on device")
    assert not out.exists() and not _tmp_files(tmp_path)


def test_real_disk_full_at_the_cache_write(sets, small_disk, tmp_path, capsys, monkeypatch):
    """The cache on a real tmpfs, filled as the entry is about to be written: one line naming the cache file and
    the free space (with the --no-cache hint); neither a tmp file nor an entry is left."""
    import evaluation.features as features
    cache = small_disk / "cache"
    monkeypatch.setattr(features, "_write_cache", filled_before(features._write_cache, small_disk))
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out",
                          str(tmp_path / "r.json"), cache=cache)
    one_line_error(rc, err, "cannot write", str(cache), "No space left on device", "B free)", "--no-cache")
    assert not list(cache.iterdir()) and not (tmp_path / "r.json").exists()


# ---- references -----------------------------------------------------------------------------------------------

def test_reference_npz_round_trip_uses_stored_statistics(sets, tmp_path, capsys):
    ref_npz = tmp_path / "ref.npz"
    rc, _, err = evaluate(capsys, "--reference", str(sets.ref), "--write-reference", str(ref_npz),
                          "--resolution", str(RES), cache=sets.cache)
    assert rc == 0, err
    with np.load(ref_npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert arrays["arr_0"].shape == (N, RES, RES, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["mu"].shape == (2048,) and arrays["sigma"].shape == (2048, 2048)
    assert arrays["mu_s"].shape == (2023,) and arrays["sigma_s"].shape == (2023, 2023)
    assert str(arrays["inception_weights"]) == "random:0"

    direct, via_npz = tmp_path / "direct.json", tmp_path / "npz.json"
    assert evaluate(capsys, "--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(direct),
                    cache=sets.cache)[0] == 0
    assert evaluate(capsys, "--samples", str(sets.npz), "--reference", str(ref_npz), "--out", str(via_npz),
                    cache=sets.cache)[0] == 0
    a, b = json.loads(direct.read_text()), json.loads(via_npz.read_text())
    assert b["reference"]["stats_source"] == "npz"
    for k in ("fid", "sfid"):
        assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-9)
    for k in ("is", "precision", "recall"):
        assert b["metrics"][k] == a["metrics"][k]

    # Plant shifted statistics: the reported FID must follow them, so they are really used.
    planted = tmp_path / "planted.npz"
    np.savez(planted, **{**arrays, "mu": arrays["mu"] + 0.5})
    assert evaluate(capsys, "--samples", str(sets.npz), "--reference", str(planted), "--out", str(via_npz),
                    cache=sets.cache)[0] == 0
    rep = json.loads(via_npz.read_text())
    from evaluation.metrics import frechet_distance
    with h5py.File(rep["samples"]["cache_path"], "r") as f:
        want = frechet_distance(f["mu"][()], f["sigma"][()], arrays["mu"] + 0.5, arrays["sigma"])
    assert rep["metrics"]["fid"] == pytest.approx(want, rel=1e-9)

    # An ADM reference (no weights tag) with random weights: its TF statistics would be meaningless here.
    adm = tmp_path / "adm.npz"
    np.savez(adm, **{k: v for k, v in arrays.items() if k != "inception_weights"})
    assert evaluate(capsys, "--samples", str(sets.npz), "--reference", str(adm), "--out", str(via_npz),
                    cache=sets.cache)[0] == 0
    rep = json.loads(via_npz.read_text())
    assert rep["reference"]["stats_source"].startswith("computed")
    assert rep["metrics"]["fid"] == pytest.approx(a["metrics"]["fid"], rel=1e-6)  # recomputed: float32 rounding


def test_features_manifest_reference_crops_its_sources(sets, tmp_path, capsys):
    pytest.importorskip("pipeline.transforms")
    feats = tmp_path / "feats"
    make_features_manifest(feats, num=N, latent_shape=(8, RES // 8, RES // 8), encoders={"tiny-dinov2": 8},
                           tokens=4)
    rng = np.random.default_rng(7)
    sources = rng.integers(0, 256, (N, 50, 41, 3), dtype=np.uint8)
    (feats / "synthetic").mkdir()
    for i, im in enumerate(sources):  # the helper's json.source is 'synthetic/{i}.jpg', relative to the set
        Image.fromarray(im).save(feats / "synthetic" / f"{i}.jpg", quality=95)
    folder = tmp_path / "srcfolder"
    folder.mkdir()
    for i in range(N):
        (folder / f"{i:04d}.jpg").write_bytes((feats / "synthetic" / f"{i}.jpg").read_bytes())
    out_m, out_f = tmp_path / "m.json", tmp_path / "f.json"
    rc, _, err = evaluate(capsys, "--samples", str(sets.npz), "--reference", str(feats), "--out", str(out_m),
                          cache=sets.cache)
    assert rc == 0, err
    assert evaluate(capsys, "--samples", str(sets.npz), "--reference", str(folder), "--out", str(out_f),
                    cache=sets.cache)[0] == 0
    m, f = json.loads(out_m.read_text()), json.loads(out_f.read_text())
    assert m["reference"]["kind"] == "features-manifest" and m["reference"]["transform"] == f"adm-center-crop@{RES}"
    assert m["metrics"] == f["metrics"]  # same sources, same ADM crop


# ---- weights --------------------------------------------------------------------------------------------------

def test_weights_file_in_either_layout_loads(tmp_path):
    from evaluation.inception import InceptionFeatures
    ref = InceptionFeatures("random:3")
    sd = {f"module.{k}": v.clone() for k, v in ref.net.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)  # pytorch-fid style: no num_batches_tracked; and a DataParallel prefix
    loaded = InceptionFeatures(str(path))
    assert loaded.comparable and loaded.weights_sha256 == sha256_file(path)
    x = np.random.default_rng(0).integers(0, 256, (1, 24, 24, 3), dtype=np.uint8)
    a, b = ref(x), loaded(x)
    assert torch.equal(a.pool, b.pool) and torch.equal(a.spatial, b.spatial) and torch.equal(a.logits, b.logits)
