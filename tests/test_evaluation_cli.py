"""`python -m evaluation` end to end with random Inception weights on tiny image sets: formats, references,
the HDF5 cache (hit, SIGKILL mid-write, corrupt entries), ENOSPC and the bad-input matrix."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, assert_user_error, make_features_manifest, run_module
from manifests import Manifest, ShardEntry, run_cli, sha256_file, write_manifest, write_shard

RES, N = 32, 6  # Inception resizes to 299 whatever the size: small images cost no less, few images do


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_samples_manifest(root: Path, images: np.ndarray, shard_size: int = 4) -> Path:
    entries = []
    for j in range(0, len(images), shard_size):
        samples = [{"__key__": f"sample_{i:07d}", "png": png_bytes(images[i]), "cls": i % 2}
                   for i in range(j, min(j + shard_size, len(images)))]
        info = write_shard(root / "shards" / f"samples-{j // shard_size:06d}.tar", samples)
        entries.append(ShardEntry(url=f"shards/{info.path.name}", nsamples=len(info.keys), sha256=info.sha256,
                                  bytes=info.bytes))
    h, w = images.shape[1:3]
    write_manifest(Manifest(root=root, name="test-samples", shardlist=entries, kind="samples",
                            num_samples=len(images), fields={"png": {"dtype": "uint8", "shape": [h, w, 3],
                                                                     "codec": "png"},
                                                             "cls": {"dtype": "int64", "shape": []}}))
    return root


def write_folder(root: Path, images, ext="png") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(root / f"{i:04d}.{ext}")
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    rng = np.random.default_rng(0)
    smp = rng.integers(0, 256, (N, RES, RES, 3), dtype=np.uint8)
    smp[:, :16] //= 2  # some structure so the sets differ in more than noise
    ref_big = rng.integers(0, 256, (N, 40, 48, 3), dtype=np.uint8)  # non-square: the ADM crop applies
    np.savez(root / "samples.npz", arr_0=smp)
    return SimpleNamespace(
        root=root, images=smp, npz=root / "samples.npz",
        manifest=write_samples_manifest(root / "samples", smp), folder=write_folder(root / "samples_png", smp),
        ref=write_folder(root / "ref", ref_big, "png"), cache=root / "cache")


def evaluate(capsys, *args, cache=None, weights="random:0"):
    """Run the CLI in-process (imports once per session); returns (rc, stdout, stderr)."""
    from evaluation.__main__ import main
    argv = [*args, "--inception-weights", weights, "--no-progress", "--batch-size", "4", "--num-workers", "2"]
    if cache is not None:
        argv += ["--cache-dir", str(cache)]
    elif "--no-cache" not in args:
        argv += ["--no-cache"]
    capsys.readouterr()
    rc = run_cli(main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *needles):
    assert_user_error(subprocess.CompletedProcess([], rc, "", err), *needles)


# ---- end to end -----------------------------------------------------------------------------------------------

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


def _tmp_files(folder: Path):
    return sorted(p for p in folder.glob(".tmp-*")) if folder.exists() else []


@pytest.mark.slow
def test_sigkill_while_writing_cache_is_rebuilt(sets, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "r.json"
    big = np.random.default_rng(1).integers(0, 256, (12, RES, RES, 3), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", arr_0=big)
    args = ["--samples", str(tmp_path / "big.npz"), "--reference", str(tmp_path / "big.npz"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "evaluation", *args, "--inception-weights", "random:0",
                             "--cache-dir", str(cache), "--batch-size", "1", "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not _tmp_files(cache):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the cache tmp file never appeared"
            time.sleep(0.05)
        time.sleep(1.0)  # let some batches land in the half-written file
        assert proc.poll() is None, "finished before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert _tmp_files(cache) and not list(cache.glob("*.h5")), "only a tmp file may exist after the kill"

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


# ---- bad inputs -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad(sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(2)
    np.savez(root / "no_arr0.npz", images=sets.images)
    np.savez(root / "object.npz", arr_0=np.array([{"a": 1}, None], dtype=object))
    np.savez(root / "float.npz", arr_0=sets.images.astype(np.float32))
    np.savez(root / "small.npz", arr_0=rng.integers(0, 256, (N, 24, 24, 3), dtype=np.uint8))
    np.savez(root / "mu_only.npz", arr_0=sets.images, mu=np.zeros(2048))
    np.savez(root / "bad_mu.npz", arr_0=sets.images, mu=np.zeros(100), sigma=np.eye(100))
    np.savez(root / "object_mu.npz", arr_0=sets.images, mu=np.array([None] * 3, dtype=object))
    mixed = write_folder(root / "mixed", list(sets.images[:5]))
    Image.fromarray(rng.integers(0, 256, (RES + 2, RES, 3), dtype=np.uint8)).save(mixed / "0005.png")
    corrupt = write_folder(root / "corrupt", list(sets.images[:5]))
    (corrupt / "0002.png").write_bytes(png_bytes(sets.images[2])[:60])
    (root / "empty").mkdir()
    badshard = root / "badshard"
    write_samples_manifest(badshard, sets.images)
    imgs = sets.images.copy()
    entries = []
    samples = [{"__key__": f"sample_{i:07d}", "png": png_bytes(imgs[i]) if i != 3 else b"\x89PNG not really",
                "cls": 0} for i in range(N)]
    info = write_shard(root / "badpng" / "shards" / "samples-000000.tar", samples)
    entries.append(ShardEntry(url=f"shards/{info.path.name}", nsamples=N, sha256=info.sha256, bytes=info.bytes))
    write_manifest(Manifest(root=root / "badpng", name="bad", shardlist=entries, kind="samples", num_samples=N,
                            fields={"png": {"dtype": "uint8", "shape": [RES, RES, 3], "codec": "png"}}))
    (root / "afile").write_text("x")
    torch.save({"conv.weight": torch.zeros(1)}, root / "wrong_keys.pth")
    return root


BAD_CASES = {
    "missing samples": (lambda s, b: ["--samples", str(b / "nope"), "--reference", str(s.ref)], ["not found", "nope"]),
    "missing reference": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "nope.npz")], ["nope.npz"]),
    "empty folder": (lambda s, b: ["--samples", str(b / "empty"), "--reference", str(s.ref)], ["no .png"]),
    "size mismatch": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "small.npz")],
                      ["32x32", "24x24"]),
    "npz without arr_0": (lambda s, b: ["--samples", str(b / "no_arr0.npz"), "--reference", str(s.ref)],
                          ["'arr_0'", "no_arr0.npz"]),
    "object array npz": (lambda s, b: ["--samples", str(b / "object.npz"), "--reference", str(s.ref)],
                         ["object array", "allow_pickle=False"]),
    "object array stats": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "object_mu.npz")],
                           ["object array"]),
    "non-uint8": (lambda s, b: ["--samples", str(b / "float.npz"), "--reference", str(s.ref)], ["float32", "uint8"]),
    "too few samples": (lambda s, b: ["--samples", str(s.npz), "--reference", str(s.ref), "--num-samples", "50"],
                        ["fewer than --num-samples 50"]),
    "zero count": (lambda s, b: ["--samples", str(s.npz), "--reference", str(s.ref), "--num-samples", "0"],
                   ["--num-samples"]),
    "mixed sizes": (lambda s, b: ["--samples", str(b / "mixed"), "--reference", str(s.ref)],
                    ["0005.png", "mixed image sizes"]),
    "corrupt png": (lambda s, b: ["--samples", str(b / "corrupt"), "--reference", str(s.ref)], ["0002.png"]),
    "corrupt png in shard": (lambda s, b: ["--samples", str(b / "badpng"), "--reference", str(s.ref)],
                             ["sample_0000003"]),
    "mu without sigma": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "mu_only.npz")],
                         ["'mu' without 'sigma'"]),
    "bad stats shape": (lambda s, b: ["--samples", str(s.npz), "--reference", str(b / "bad_mu.npz")],
                        ["'mu' has shape [100]"]),
    "unwritable out": (lambda s, b: ["--samples", str(s.npz), "--reference", str(s.ref), "--out",
                                     str(b / "afile" / "r.json")], ["not writable", "afile"]),
    "no samples": (lambda s, b: ["--reference", str(s.ref)], ["--samples is required"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_exit_2(case, sets, bad, tmp_path, capsys):
    make_args, needles = BAD_CASES[case]
    args = make_args(sets, bad)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "r.json")]
    rc, _, err = evaluate(capsys, *args, cache=sets.cache)  # the reference's entry hits: failures come fast
    one_line_error(rc, err, *needles)
    assert not _tmp_files(sets.cache) and not (tmp_path / "r.json").exists()


def test_weights_errors(sets, bad, tmp_path, capsys, monkeypatch):
    base = ["--samples", str(sets.npz), "--reference", str(sets.ref), "--out", str(tmp_path / "r.json")]
    rc, _, err = evaluate(capsys, *base, weights=str(tmp_path / "missing.pth"))
    one_line_error(rc, err, "Inception weights not found", "missing.pth")
    rc, _, err = evaluate(capsys, *base, weights=str(bad / "wrong_keys.pth"))
    one_line_error(rc, err, "wrong_keys.pth", "do not match")
    rc, _, err = evaluate(capsys, *base, weights="random:abc")
    one_line_error(rc, err, "random:SEED")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    from evaluation.__main__ import main
    capsys.readouterr()
    rc = run_cli(main, [*base, "--no-cache", "--no-progress"])
    one_line_error(rc, capsys.readouterr().err, "download", str(tmp_path / "torchhome" / "hub" / "checkpoints"),
                   "--inception-weights")
    if not torch.cuda.is_available():
        rc, _, err = evaluate(capsys, *base, "--device", "cuda")
        one_line_error(rc, err, "--device cuda")


def test_bad_input_subprocess_has_no_traceback(sets, tmp_path):
    p = run_module("evaluation", "--samples", str(tmp_path / "missing.npz"), "--reference", str(sets.ref),
                   "--inception-weights", "random:0", timeout=120)
    assert_user_error(p, "missing.npz")


def test_align_is_dispatched_lazily(monkeypatch):
    import types

    from evaluation.__main__ import main
    seen = {}
    stub = types.ModuleType("evaluation.align_cli")
    stub.main = lambda argv: seen.setdefault("argv", list(argv)) and 0
    monkeypatch.setitem(sys.modules, "evaluation.align_cli", stub)
    assert main(["align", "--k", "10"]) == 0
    assert seen["argv"] == ["--k", "10"]
