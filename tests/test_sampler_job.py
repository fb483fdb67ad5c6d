"""The sampling job end to end on CPU: SiT-Debug/2 + tiny-vae, our and official checkpoint layouts."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, assert_user_error, filled_before, free_port, run_module
from manifests import iter_shard, load_manifest
from common import run_cli
from trainer.sampling import job as job
from trainer.models import SiT_models
from trainer.models import read_checkpoint

KW = dict(input_size=8, in_channels=4, num_classes=4, encoder_depth=2, z_dims=[64], class_dropout_prob=0.1)
FAST = ["--steps", "3", "--shard-size", "4"]  # 64 px images from 8x8 latents; 3 SDE steps keep it cheap


def debug_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = SiT_models["SiT-Debug/2"](**KW)
    with torch.no_grad():  # the SiT init zeroes adaLN and the final layer; give the output some structure
        for n, p in m.named_parameters():
            if "adaLN" in n or "final_layer" in n:
                p.normal_(0, 0.05)
    return m


def run_config() -> dict:
    return {"model": "SiT-Debug/2", "model_kwargs": dict(KW), "path": "linear", "encoders": ["tiny-dinov2"],
            "vae": "tiny-vae", "latent_scale": 0.18215, "latent_shift": 0.0, "resolution": 64,
            "classes": ["c0", "c1", "c2", "c3"], "manifest": "none", "train": {}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """One set of weights in every layout the loader accepts."""
    from trainer.loop import checkpoint
    root = tmp_path_factory.mktemp("ckpts")
    sd = debug_model().state_dict()
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": sd, "ema": sd, "opt": {}, "scaler": {}, "step": 7, "rng": {}, "config": run_config()},
               run / "checkpoints" / "0000007.pt")
    export = checkpoint.export_ema(run, 7, sd, run_config())
    args = argparse.Namespace(model="SiT-Debug/2", encoder_depth=2, resolution=64, num_classes=4,
                              path_type="linear", enc_type="dinov2-vit-b")
    torch.save({"model": sd, "ema": sd, "opt": {"state": {}}, "args": args, "steps": 7}, root / "official.pt")
    torch.save(sd, root / "last.pt")
    depth = KW["encoder_depth"]
    legacy = {(f"decoder_blocks.{int(k.split('.')[1]) - depth}." + k.split(".", 2)[2]
               if k.startswith("blocks.") and int(k.split(".")[1]) >= depth else k): v for k, v in sd.items()}
    torch.save({"ema": legacy, "args": args, "steps": 7}, root / "legacy.pt")
    return {"train": run / "checkpoints" / "0000007.pt", "run": run, "export": export,
            "official": root / "official.pt", "bare": root / "last.pt", "legacy": root / "legacy.pt", "sd": sd}


def sample(ckpt, out, *extra: str) -> int:
    return run_cli(job.main, ["--ckpt", str(ckpt), "--out", str(out), *FAST, *extra])


def images(out: Path) -> dict[int, tuple[np.ndarray, int]]:
    """index -> (image, label) over the manifest's shards; asserts each index appears once."""
    m = load_manifest(out, kind="samples", verify=True)
    got: dict[int, tuple[np.ndarray, int]] = {}
    for sp in m.shard_paths():
        for s in iter_shard(sp):
            i = int(s["__key__"].split("_")[1])
            assert i not in got, f"duplicate index {i}"
            got[i] = (s["png"], s["cls"])
    assert sorted(got) == list(range(m.num_samples)), "missing indices"
    return got


def same_images(a: dict, b: dict, exact: bool = True) -> None:
    """Same labels; images byte-equal, or (exact=False) equal up to float rounding of batched matmuls.

    Labels and noise are bit-identical for any batch cut (per-sample generators), but a float32 GEMM's
    rounding depends on the number of rows (3.6e-7 on SiT-Debug here), so a pixel can land one uint8 level
    off after truncation. We allow that on < 1% of values and never more than 2 levels.
    """
    assert a.keys() == b.keys()
    for i in a:
        assert a[i][1] == b[i][1], f"label of {i}"
        if exact:
            assert np.array_equal(a[i][0], b[i][0]), f"image {i}"
        else:
            d = np.abs(a[i][0].astype(int) - b[i][0].astype(int))
            assert d.max() <= 2 and (d > 0).mean() < 0.01, (i, d.max(), (d > 0).mean())


@pytest.fixture(scope="module")
def reference(ckpts, tmp_path_factory) -> dict:
    """8 samples, batch 8, one process, with CFG on an interval: the output every variant must equal."""
    out = tmp_path_factory.mktemp("ref")
    assert sample(ckpts["train"], out, "--num-samples", "8", "--batch-size", "8", "--cfg-scale", "2",
                  "--guidance-high", "0.7", "--npz") == 0
    return {"out": out, "images": images(out)}


def test_outputs_and_manifest(reference):
    out, imgs = reference["out"], reference["images"]
    m = load_manifest(out, kind="samples")
    assert m.fields["png"]["shape"] == [64, 64, 3] and m.fields["cls"]["dtype"] == "int64"
    s = m.extra["sampler"]
    assert (s["mode"], s["steps"], s["cfg_scale"], s["guidance_high"], s["nfe"]) == ("sde", 3, 2.0, 0.7, 3)
    assert m.extra["checkpoint"]["step"] == 7 and len(m.extra["checkpoint"]["sha256"]) == 64
    with np.load(out / "samples.npz", allow_pickle=False) as z:  # what the ADM evaluator reads
        arr = z["arr_0"]
    assert arr.shape == (8, 64, 64, 3) and arr.dtype == np.uint8
    for i in range(8):
        assert np.array_equal(arr[i], imgs[i][0])
    from PIL import Image
    with Image.open(out / "grid.png") as g:
        assert g.size == (3 * 64, 3 * 64)  # 8 samples -> a 3x3 grid
    assert not list(out.rglob(".tmp-*"))
    assert len({im.tobytes() for im, _ in imgs.values()}) == 8  # distinct samples
    assert all(0 <= c < 4 for _, c in imgs.values())


def test_layouts_give_the_same_images(ckpts, reference, tmp_path):
    """The export, an official dict, a bare state dict and a legacy file give byte-identical images."""
    for name, ckpt, extra in [("export", ckpts["export"], []),
                              ("official", ckpts["official"], ["--vae", "tiny-vae", "--projector-embed-dims", "64"]),
                              ("bare", ckpts["bare"], ["--vae", "tiny-vae", "--model", "SiT-Debug/2",
                                                       "--encoder-depth", "2", "--projector-embed-dims", "64",
                                                       "--resolution", "64", "--num-classes", "4"]),
                              ("legacy", ckpts["legacy"], ["--vae", "tiny-vae", "--projector-embed-dims", "64"])]:
        out = tmp_path / name
        assert sample(ckpt, out, "--num-samples", "8", "--batch-size", "8", "--cfg-scale", "2",
                      "--guidance-high", "0.7", *extra) == 0, name
        same_images(images(out), reference["images"])


def test_batch_size_does_not_change_images(ckpts, reference, tmp_path):
    """Batch 3 instead of 8: the same labels and noise, hence the same images (up to GEMM rounding)."""
    out = tmp_path / "b3"
    assert sample(ckpts["train"], out, "--num-samples", "8", "--batch-size", "3", "--cfg-scale", "2",
                  "--guidance-high", "0.7") == 0
    same_images(images(out), reference["images"], exact=False)
    cfg = job.parse(["--ckpt", "x", "--out", "y", "--seed", "5"])
    n8, y8, _ = job.draw_inputs(cfg, range(0, 8), (4, 8, 8), 4, None)
    parts = [job.draw_inputs(cfg, range(a, b), (4, 8, 8), 4, None) for a, b in ((0, 3), (3, 6), (6, 8))]
    assert torch.equal(n8, torch.cat([p[0] for p in parts])) and torch.equal(y8, torch.cat([p[1] for p in parts]))


def test_official_loader(ckpts):
    c = read_checkpoint(ckpts["official"])
    assert c.format == "official-train" and c.step == 7 and c.args["encoder_depth"] == 2
    assert all(torch.equal(c.weights[k], ckpts["sd"][k]) for k in ckpts["sd"])
    c = read_checkpoint(ckpts["legacy"])  # encoder_depth from its args
    assert c.legacy and set(c.weights) == set(ckpts["sd"])
    assert all(torch.equal(c.weights[k], ckpts["sd"][k]) for k in ckpts["sd"])
    c = read_checkpoint(ckpts["bare"])
    assert c.format == "state-dict" and set(c.weights) == set(ckpts["sd"])
    c = read_checkpoint(ckpts["run"])  # a run folder -> its newest export
    assert c.format == "ours-export" and c.config["model"] == "SiT-Debug/2"
    c = read_checkpoint(ckpts["train"])
    assert c.format == "ours-train" and c.step == 7


class Payload:
    """A pickled object that would run a command when unpickled."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_foreign_pickle_refused(ckpts, tmp_path, capsys):
    bad = tmp_path / "evil.pt"
    torch.save({"ema": ckpts["sd"], "args": argparse.Namespace(model="SiT-Debug/2"), "x": Payload()}, bad)
    assert sample(bad, tmp_path / "o", "--projector-embed-dims", "64") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "posix.system" in err[-1] and "not allowed" in err[-1], err
    assert not (Path.cwd() / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    other = tmp_path / "path.pt"  # a harmless but unlisted class is refused too: the allowlist is exact
    torch.save({"ema": ckpts["sd"], "args": Path("x")}, other)
    assert sample(other, tmp_path / "o") == 2
    assert "pathlib" in capsys.readouterr().err


def _user_error(capsys, rc: int, *needles: str) -> None:
    assert_user_error(subprocess.CompletedProcess([], rc, "", capsys.readouterr().err), *needles)


def test_bad_inputs(ckpts, tmp_path, capsys):
    out = tmp_path / "o"
    _user_error(capsys, sample(tmp_path / "nope.pt", out), "checkpoint not found", "nope.pt")
    _user_error(capsys, sample(ckpts["official"], out, "--projector-embed-dims", "768"),
                "projectors.0.4.weight", "--projector-embed-dims")
    _user_error(capsys, sample(ckpts["official"], out, "--projector-embed-dims", "64", "--model", "SiT-S/2"),
                "does not fit SiT-S/2", "--model")
    sd = dict(ckpts["sd"])
    sd.pop("final_layer.linear.bias")
    torch.save(sd, tmp_path / "missing.pt")
    _user_error(capsys, sample(tmp_path / "missing.pt", out, "--model", "SiT-Debug/2", "--encoder-depth", "2",
                               "--projector-embed-dims", "64", "--resolution", "64", "--num-classes", "4"),
                "missing", "final_layer.linear.bias")
    _user_error(capsys, sample(ckpts["train"], out, "--num-samples", "0"), "--num-samples", "positive")
    _user_error(capsys, sample(ckpts["train"], out, "--num-samples", "-3"), "--num-samples")
    (tmp_path / "file").write_text("x")
    _user_error(capsys, sample(ckpts["train"], tmp_path / "file" / "sub"), "not writable", "file")
    _user_error(capsys, sample(ckpts["train"], out, "--model", "SiT-B/2"), "contradicts")
    _user_error(capsys, sample(ckpts["official"], out, "--model", "SiT-Foo/2"), "unknown model", "SiT-Foo/2")
    _user_error(capsys, sample(ckpts["train"], out, "--vae", "nope"), "unknown VAE", "nope")
    cfg = {**run_config(), "model": "SiT-S/2"}  # weights of one size, config of another
    torch.save({"ema": ckpts["sd"], "step": 1, "config": cfg}, tmp_path / "size.pt")
    _user_error(capsys, sample(tmp_path / "size.pt", out), "does not fit SiT-S/2", "size.pt")
    nan = {k: (v.clone().fill_(float("nan")) if k == "final_layer.linear.bias" else v) for k, v in ckpts["sd"].items()}
    torch.save({"ema": nan, "step": 1, "config": run_config()}, tmp_path / "nan.pt")
    _user_error(capsys, sample(tmp_path / "nan.pt", out, "--num-samples", "2"), "non-finite", "0..1")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _user_error(capsys, sample(tmp_path / "junk.pt", out), "junk.pt")
    assert not out.exists() or not (out / "manifest.json").exists()


def test_bad_input_cli_exit_code(ckpts, tmp_path):
    """The real entry point: exit 2, one line, no traceback."""
    p = run_module("trainer", "sample", "--ckpt", str(ckpts["official"]), "--out", str(tmp_path / "o"),
                   "--projector-embed-dims", "32")
    assert_user_error(p, "--projector-embed-dims")


def test_other_settings_refused(ckpts, reference, capsys):
    rc = sample(ckpts["train"], reference["out"], "--num-samples", "8", "--batch-size", "8", "--cfg-scale", "3")
    _user_error(capsys, rc, "other settings", "cfg_scale")


def test_balanced(ckpts, tmp_path):
    out = tmp_path / "bal"
    assert sample(ckpts["train"], out, "--num-samples", "12", "--balanced", "--steps", "1", "--mode", "ode") == 0
    labels = [c for _, c in images(out).values()]
    assert np.bincount(labels, minlength=4).tolist() == [3, 3, 3, 3]
    out = tmp_path / "bf16"  # bf16 autocast runs (on CPU too) and gives the same labels
    assert sample(ckpts["train"], out, "--num-samples", "12", "--balanced", "--steps", "1", "--mode", "ode",
                  "--precision", "bf16") == 0
    assert [c for _, c in images(out).values()] == labels


def _fail_write(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full(ckpts, tmp_path, monkeypatch, capsys):
    """ENOSPC at the write call: one line naming the file; no partial shard, tmp file or manifest remains."""
    out = tmp_path / "full"
    monkeypatch.setattr(tarfile.TarFile, "addfile", _fail_write)
    _user_error(capsys, sample(ckpts["train"], out, "--num-samples", "4"), "samples-000000.tar",
                "No space left on device")
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob("*.tar")) and not (out / "manifest.json").exists()
    monkeypatch.undo()
    real_open = zipfile.ZipFile.open

    def open_then_fail(self, name, mode="r", **kw):  # the npz member's writes hit a full disk
        f = real_open(self, name, mode, **kw)
        if mode == "w":
            f.write = _fail_write
        return f
    monkeypatch.setattr(zipfile.ZipFile, "open", open_then_fail)
    _user_error(capsys, sample(ckpts["train"], out, "--num-samples", "4", "--npz"), "samples.npz",
                "No space left on device")
    assert not (out / "samples.npz").exists() and not list(out.rglob(".tmp-*"))
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("writer,culprit", [("write_shard", "shards/samples-000000.tar"),
                                            ("write_npz", "samples.npz")])
def test_real_disk_full(ckpts, small_disk, monkeypatch, capsys, writer, culprit):
    """A real full tmpfs at the sample shard or the npz write: one line naming it and the free space; no tmp
    file, no partial file, no manifest."""
    out = small_disk / "out"
    monkeypatch.setattr(job, writer, filled_before(getattr(job, writer), small_disk))
    extra = ["--npz"] if writer == "write_npz" else []
    _user_error(capsys, sample(ckpts["train"], out, "--num-samples", "4", *extra), str(out / culprit),
                "No space left on device", "B free)")
    assert not list(out.rglob(".tmp-*")) and not (out / culprit).exists() and not (out / "manifest.json").exists()


def _cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["trainer", "sample", "--ckpt", str(ckpt), "--out", str(out), *FAST, "--num-samples", "8",
            "--batch-size", "8", "--cfg-scale", "2", "--guidance-high", "0.7", *extra]


@pytest.mark.slow
def test_two_processes(ckpts, reference, tmp_path):
    """torchrun with 2 CPU ranks (gloo): disjoint, complete indices and the same images as one process."""
    out = tmp_path / "ddp"
    p = run_module("torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), "-m", *_cmd(ckpts["train"], out), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    same_images(images(out), reference["images"], exact=False)  # each rank's batches hold 4, not 8
    # Both ranks worked: shard 0 (rank 0) and shard 1 (rank 1) exist, each listed once.
    assert [s.url for s in load_manifest(out).shardlist] == ["shards/samples-000000.tar", "shards/samples-000001.tar"]


@pytest.mark.slow
def test_sigkill_then_rerun(ckpts, reference, tmp_path):
    """SIGKILL after shard 1's tar is in place but before its sidecar (shard 0 is finished).

    The re-run keeps shard 0 untouched, redoes shard 1 byte for byte, and every index exists exactly once.
    """
    out = tmp_path / "killed"
    cmd = _cmd(ckpts["train"], out, "--shard-size", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", job.PAUSE_ENV: "1:120"}
    proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    shards = out / "shards"
    deadline = time.time() + 180
    while not (shards / "samples-000001.tar").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert alive and (shards / "samples-000001.tar").exists(), err[-3000:]
    assert (shards / "samples-000000.json").exists() and not (shards / "samples-000001.json").exists()
    assert not (out / "manifest.json").exists()
    kept = (shards / "samples-000000.tar").stat().st_mtime_ns
    before = (shards / "samples-000001.tar").read_bytes()
    assert run_cli(job.main, cmd[2:]) == 0
    same_images(images(out), reference["images"], exact=False)  # every index exactly once, same images
    assert (shards / "samples-000000.tar").stat().st_mtime_ns == kept  # the finished shard was kept
    assert (shards / "samples-000001.tar").read_bytes() == before  # the redone shard is byte-identical
    assert not list(out.rglob(".tmp-*"))
