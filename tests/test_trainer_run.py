"""Trainer runs: DDP, precision, numeric faults, bad inputs, disk full, learning (resume: test_trainer_resume.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, assert_user_error, filled_before, make_features_manifest, run_module
from manifests import load_manifest, write_manifest, write_shard
from common import run_cli
from manifests.shards import iter_shard
from trainer_common import ENV, args, ckpt, feats, run_inproc, small_feats, stats  # noqa: F401

from trainer.__main__ import main as trainer_main
from trainer.data.indexed import epoch_permutation


@pytest.fixture(scope="module")
def trained(small_feats, tmp_path_factory) -> Path:
    """A run trained for 50 fp32 steps (batch 2, lr 1e-3): the SiT's output is no longer zero, Adam has history."""
    run = tmp_path_factory.mktemp("trained") / "run"
    rc = run_cli(trainer_main, args(small_feats, run, steps=50, batch=2) + ["--ckpt-every", "50", "--log-every",
                                                                             "10", "--lr", "1e-3"])
    assert rc == 0
    return run


def _continue_as(trained: Path, run: Path, precision: str, steps: int, *extra: str) -> None:
    """Copy the trained run and go on from its step-50 checkpoint in `precision` (a resume normally refuses a
    change of precision, so the saved config is edited; an fp16 run gets a fresh GradScaler state)."""
    import shutil
    shutil.copytree(trained, run)
    path = run / "checkpoints" / "0000050.pt"
    ck = torch.load(path, weights_only=True)
    ck["config"]["train"]["precision"] = precision
    if precision == "fp16":
        ck["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16).state_dict()
    torch.save(ck, path)
    rc = run_cli(trainer_main, args(ck["config"]["manifest"], run, steps=steps, batch=2) + [
        "--precision", precision, "--lr", "1e-3", "--ckpt-every", str(steps), "--log-every", "1", *extra])
    assert rc == 0


def test_fp16_and_bf16_agree_with_fp32(trained, tmp_path):
    """From a trained state, 20 more steps in fp16 (GradScaler) and bf16 agree with fp32 within a few ulps of
    each dtype (eps: fp16 2^-10, bf16 2^-7) in losses and gradient norms, and the weights they reach differ
    from fp32's by a few sqrt(eps) of the 20 steps' update."""
    runs = {p: tmp_path / p for p in ("fp32", "fp16", "bf16")}
    for p, run in runs.items():
        _continue_as(trained, run, p, 70)
    rows = {p: [r for r in stats(run) if r["step"] > 50] for p, run in runs.items()}
    assert all([r["step"] for r in v] == list(range(51, 71)) for v in rows.values())
    assert all(r["skipped"] == 0 for r in rows["fp16"]) and rows["fp16"][0]["loss_scale"] == 2.0 ** 16
    w50 = ckpt(runs["fp32"], 50)["model"]
    w = {p: ckpt(run, 70)["model"] for p, run in runs.items()}
    flat = lambda sd: torch.cat([v.flatten().double() for k, v in sd.items() if k != "pos_embed"])  # noqa: E731
    update = (flat(w["fp32"]) - flat(w50)).norm()
    assert update > 0
    for p, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        eps = torch.finfo(dt).eps
        loss = np.array([r["loss"] for r in rows[p]])
        loss32 = np.array([r["loss"] for r in rows["fp32"]])
        gn, gn32 = np.array([r["grad_norm"] for r in rows[p]]), np.array([r["grad_norm"] for r in rows["fp32"]])
        err_loss, err_gn = np.abs(loss / loss32 - 1).max(), np.abs(gn / gn32 - 1).max()
        err_w = float((flat(w[p]) - flat(w["fp32"])).norm() / update)
        print(f"{p}: eps {eps:.2e}; max rel loss {err_loss / eps:.2f} eps, grad norm {err_gn / eps:.2f} eps; "
              f"weights {err_w:.2e} of the update ({err_w / eps ** 0.5:.2f} sqrt(eps))")
        # Measured on CPU: losses within 0.25 eps, grad norms within 1 eps, weights within 1.1 sqrt(eps) of the
        # update. Rounding in Adam's small-gradient coordinates adds up like a random walk, hence sqrt(eps).
        assert 0 < err_loss < 2 * eps, (p, err_loss / eps)  # > 0: the low precision was really in effect
        assert err_gn < 8 * eps, (p, err_gn / eps)  # an unscaled fp16 gradient would be 2^16 off
        assert err_w < 4 * eps ** 0.5, (p, err_w / eps ** 0.5)


def test_fp16_overflow_is_skipped_logged_and_counted(feats, tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = run_inproc(args(feats, run, steps=3, batch=2) + ["--precision", "fp16", "--loss-scale-init",
                                                                 str(2.0 ** 40)], capsys)
    assert rc == 0, err
    rows = stats(run)
    assert rows[0]["skipped"] == 1 and rows[0]["loss_scale"] == 2.0 ** 39 and math.isfinite(rows[0]["loss"])
    assert rows[-1]["skipped"] >= 1
    assert "step 1: fp16 overflow, loss scale 1.09951e+12 -> 5.49756e+11; update skipped" in err
    assert ckpt(run, 3)["skipped"] == rows[-1]["skipped"]  # the count survives a resume


def _corrupt_latent(root: Path, key: str, field: str = "latent") -> None:
    """Put a NaN into one sample's `field` and re-list the shard (a valid but corrupt data set)."""
    m = load_manifest(root)
    for i, entry in enumerate(m.shardlist):
        samples = list(iter_shard(root / entry.url, decode=False))
        if key not in [s["__key__"] for s in samples]:
            continue
        for s in samples:
            if s["__key__"] == key:
                from manifests import decode_npy, encode_npy
                arr = decode_npy(s[f"{field}.npy"])
                arr.flat[7] = np.nan
                s[f"{field}.npy"] = encode_npy(arr)
        info = write_shard(root / entry.url, samples)
        entry.sha256, entry.bytes = info.sha256, info.bytes
    write_manifest(m)


def test_nan_latent_stops_with_step_and_key_keeping_checkpoint(tmp_path, capsys):
    root = tmp_path / "feat"
    make_features_manifest(root, num=16, classes=4, shard_size=8)
    # Read at data position 3 with batch 4 (ids follow shard order), i.e. by optimiser step 4 (1-based, like
    # checkpoint names).
    bad = int(epoch_permutation(0, 0, 16)[3 * 4 + 1])
    _corrupt_latent(root, f"img{bad:05d}")
    run = tmp_path / "run"
    rc, err = run_inproc(args(root, run, steps=6), capsys)
    assert rc == 2
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "step 4:" in lines[0] and f"img{bad:05d}" in lines[0] and "latent" in lines[0]
    assert "0000002.pt" in lines[0] and ckpt(run, 2)["step"] == 2
    assert not (run / "checkpoints" / "0000004.pt").exists()
    # Re-running with a different batch size in the same folder is refused, naming the setting.
    rc, err = run_inproc(args(root, run, steps=6, batch=2), capsys)
    assert rc == 2 and "train.batch_size" in err


def test_nan_encoder_token_stops_with_step_key_and_field(small_feats, tmp_path, capsys):
    """A NaN in one sample's encoder tokens (not the latent): the error names the step, the key and the field."""
    import shutil
    root = tmp_path / "feat"
    shutil.copytree(small_feats, root)
    bad = int(epoch_permutation(0, 0, 16)[2 * 4 + 3])  # read by optimiser step 3 (batch 4)
    _corrupt_latent(root, f"img{bad:05d}", field="tiny-dinov2")
    rc, err = run_inproc(args(root, tmp_path / "run", steps=6), capsys)
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "step 3:" in lines[0] and f"'img{bad:05d}'" in lines[0], err
    assert "field 'tiny-dinov2'" in lines[0] and "0000002.pt" in lines[0], lines[0]


def test_persistent_nonfinite_loss_stops_the_run(feats, tmp_path, capsys):
    run = tmp_path / "run"
    # lr 1e30: the first update blows the weights up, every later loss is non-finite.
    rc, err = run_inproc(args(feats, run, steps=20) + ["--lr", "1e30", "--max-nonfinite", "3", "--ckpt-every",
                                                        "1"], capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: step 4: loss/gradients non-finite for 3 consecutive steps (since step 2)"), line
    # Checkpoints wait while steps are skipped: 1 is the last one, and it is kept.
    assert "0000001.pt" in line and ckpt(run, 1)["step"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000001.pt"]


def test_init_from_and_dry_run(feats, tmp_path, capsys):
    from trainer.models.sit import SiT
    run = tmp_path / "run"
    rc, err = run_inproc(args(feats, run, steps=2), capsys)
    assert rc == 0, err
    export = run / "export" / "ema-0000002.safetensors"
    rc, err = run_inproc(args(feats, tmp_path / "ft", steps=1) + ["--init-from", str(export)], capsys)
    assert rc == 0, err
    ft = ckpt(tmp_path / "ft", 1)
    assert ft["step"] == 1 and not (tmp_path / "ft" / "checkpoints" / "0000002.pt").exists()
    # A checkpoint from a different model size: a narrower SiT of the same depth.
    other = SiT(hidden_size=32, depth=4, num_heads=4, projector_dim=256, encoder_depth=2, num_classes=4, z_dims=[64])
    torch.save(other.state_dict(), tmp_path / "last.pt")
    rc, err = run_inproc(args(feats, tmp_path / "ft2", steps=1) + ["--init-from", str(tmp_path / "last.pt")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "last.pt" in err, err
    # An official REPA training dict (args is an argparse.Namespace, loaded through an allowlist).
    import argparse
    from safetensors.torch import load_file
    sd = load_file(export)
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=2),
                "steps": 2}, tmp_path / "0000002.pt")
    rc, err = run_inproc(args(feats, tmp_path / "ft3", steps=1) + ["--init-from", str(tmp_path / "0000002.pt")],
                         capsys)
    assert rc == 0, err
    rc = run_cli(trainer_main, args(feats, tmp_path / "dry") + ["--preset", "sit-xl2-repa", "--encoders",
                                                                  "tiny-dinov2", "--enc-depth", "3", "--dry-run"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["model"] == "SiT-Debug/2" and out["train"]["steps"] == 6  # flags beat the preset
    assert out["model_kwargs"]["encoder_depth"] == 3 and out["train"]["proj_coeff"] == 0.5
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing
    rc = run_cli(trainer_main, ["train", "--manifest", str(feats), "--run-dir", str(tmp_path / "d2"),
                                "--preset", "sit-l2-repa", "--encoders", "tiny-dinov2", "--dry-run"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["model"] == "SiT-L/2" and out["train"]["proj_loss"] == "ntxent"
    assert out["model_kwargs"]["encoder_depth"] == 8 and out["train"]["steps"] == 700_000


def _bad_inputs(feats: Path, tmp: Path) -> list[tuple[list[str], str]]:
    wrong = tmp / "wrong"
    wrong.mkdir()
    raw = json.loads((feats / "manifest.json").read_text())
    raw["repa"]["schema"] = 99
    (wrong / "manifest.json").write_text(json.dumps(raw))
    (tmp / "afile").write_text("x")
    notjson = tmp / "notjson"
    notjson.mkdir()
    (notjson / "manifest.json").write_text("{not json")
    noshard = tmp / "noshard"
    noshard.mkdir()
    raw = json.loads((feats / "manifest.json").read_text())
    (noshard / "manifest.json").write_text(json.dumps(raw))  # lists shards that are not beside it
    import shutil
    flipped = tmp / "flipped"
    shutil.copytree(feats, flipped)
    shard = flipped / "shards" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF  # same size, different bytes: only --verify can tell
    shard.write_bytes(bytes(data))
    return [
        (args(flipped, tmp / "r13", "--verify"), "fails sha256 check"),
        (args(notjson, tmp / "r11"), "is not valid JSON"),
        (args(noshard, tmp / "r12"), "does not exist"),
        (args(tmp / "nope", tmp / "r1"), "manifest not found"),
        (args(wrong, tmp / "r2"), "schema version 99"),
        (args(feats, tmp / "r3", "--encoders", "tiny-siglip"), "no field 'tiny-siglip'"),
        (args(feats, tmp / "r4") + ["--model", "SiT-B/4"], "model expects 64 tokens"),
        (args(feats, tmp / "r5") + ["--model", "SiT-Huge/2"], "invalid choice: 'SiT-Huge/2'"),
        (args(feats, tmp / "r6", batch=0), "--batch-size: must be a positive integer, got 0"),
        (args(feats, tmp / "r7", steps=-3), "--steps: must be a positive integer, got -3"),
        (args(feats, tmp / "r8", "--micro-batch", "3"), "--micro-batch 3 must divide the per-rank batch 4"),
        (args(feats, tmp / "afile" / "run"), "run folder (--run-dir) is not writable"),
        (args(feats, tmp / "r9", "--init-from", str(tmp / "missing.pt")), "missing.pt"),
        (args(feats, tmp / "r10", "--enc-depth", "9"), "encoder_depth 9 must be in [1, depth=4]"),
    ]


def test_bad_inputs_one_line_exit_2(feats, tmp_path, capsys):
    for argv, needle in _bad_inputs(feats, tmp_path):
        rc, err = run_inproc(argv, capsys)
        lines = [x for x in err.strip().splitlines() if x.strip()]  # progress bars may precede the error
        errors = [x for x in lines if x.startswith("error:")]
        assert rc == 2 and errors == lines[-1:] and needle in lines[-1], (argv, err)
        assert "Traceback" not in err
        assert not (tmp_path / "r1" / "checkpoints").exists()


@pytest.mark.slow
def test_bad_input_real_process_no_traceback(feats, tmp_path):
    p = run_module("trainer", *args(feats, tmp_path / "r", "--encoders", "dinov2-vit-b"), timeout=120)
    assert_user_error(p, "no field 'dinov2-vit-b'")


@pytest.mark.slow
def test_learning_on_pipeline_features(tiny_features, tmp_path):
    """Denoising and REPA losses both fall clearly on the real tiny pipeline's features (60 steps: the denoising
    loss ends at 0.38 of its start, the REPA loss 0.37 lower; the bars are 0.6 and 0.15)."""
    run = tmp_path / "learn"
    a = ["train", "--manifest", str(tiny_features), "--run-dir", str(run), "--model", "SiT-Debug/2",
         "--batch-size", "4", "--steps", "60", "--ckpt-every", "60", "--log-every", "5", "--lr", "1e-3",
         "--precision", "fp32", "--num-workers", "1", "--seed", "1"]
    assert run_cli(trainer_main, a) == 0
    rows = stats(run)
    den0, proj0 = rows[0]["denoise"], rows[0]["proj_loss"]
    den1, proj1 = np.mean([r["denoise"] for r in rows[-3:]]), np.mean([r["proj_loss"] for r in rows[-3:]])
    assert den1 < 0.6 * den0, (den0, den1)
    assert proj1 < proj0 - 0.15, (proj0, proj1)


@pytest.mark.parametrize("writer,culprit", [("checkpoint", "checkpoints/0000002.pt"),
                                            ("export", "export/ema-0000002.safetensors"),
                                            ("stats", "stats.jsonl")])
def test_real_disk_full(small_feats, small_disk, monkeypatch, capsys, writer, culprit):
    """The run folder on a real tmpfs, filled just before one writer runs: exit 2, one line naming the file and
    the free space, and nothing half-written (no tmp file, no partial checkpoint, no half stats line)."""
    from trainer.loop import checkpoint
    import trainer.loop.train as train_mod
    run = small_disk / "run"
    if writer == "checkpoint":
        monkeypatch.setattr(checkpoint, "save", filled_before(checkpoint.save, small_disk))
    elif writer == "export":
        monkeypatch.setattr(checkpoint, "export_ema", filled_before(checkpoint.export_ema, small_disk))
    else:
        monkeypatch.setattr(train_mod, "append_line", filled_before(train_mod.append_line, small_disk))
    rc, err = run_inproc(args(small_feats, run, steps=2, batch=2), capsys)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 2 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert str(run / culprit) in lines[-1] and "No space left on device" in lines[-1], lines[-1]
    assert "B free)" in lines[-1], lines[-1]  # e.g. '(0 B free)'
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]
    if writer == "export":  # the checkpoint before it is whole and loads
        assert ckpt(run, 2)["step"] == 2 and not (run / culprit).exists()
    elif writer == "checkpoint":
        assert not (run / "checkpoints" / "0000002.pt").exists()
    else:
        assert (run / "stats.jsonl").read_bytes() == b""  # cut back: no half line




def test_the_vae_loads_only_for_a_run_that_draws_grids(tmp_path, capsys):
    """Grids due (--sample-every <= --steps): the run's VAE loads before step 0, so one that cannot load warns at
    once. None due: it is never loaded (no warning, no cost)."""
    m = make_features_manifest(tmp_path / "f", num=8, classes=4, shard_size=8, latent_shape=(8, 8, 8), tokens=16)
    m.fields["latent"]["vae"]["name"] = "no-such-vae"
    write_manifest(m)
    rc, err = run_inproc(args(tmp_path / "f", tmp_path / "a", "--sample-every", "2", steps=2, batch=2), capsys)
    assert rc == 0 and "sample grids off: cannot load the run's VAE 'no-such-vae'" in err, err
    rc, err = run_inproc(args(tmp_path / "f", tmp_path / "b", "--sample-every", "3", steps=2, batch=2), capsys)
    assert rc == 0 and "VAE" not in err, err
