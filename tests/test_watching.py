"""Watching a long run: TensorBoard curves across a resume, log.txt, sample grids, retention, --resume-from,
the FID watcher, and the pixel-vae.

Runs use the 64-px pixel-vae features of tests/demo_data.py (an 8x8 latent grid, plain SiT), so a step costs
milliseconds and a sample grid well under a second.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from demo_data import write_pixel_features
from helpers import REPO, assert_user_error
from common import run_cli

from trainer.__main__ import main as trainer_main
from trainer.loop.checkpoint import kept_steps

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def pix(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixfeat")
    write_pixel_features(root, classes=4, per_class=8, resolution=64)
    return root


def train_args(manifest: Path, run: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["train", "--manifest", str(manifest), "--run-dir", str(run), "--model", "SiT-Debug/2", "--encoders",
            "none", "--batch-size", "4", "--steps", str(steps), "--log-every", "1", "--precision", "fp32",
            "--num-workers", "0", *extra]


def stats(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]


def names(folder: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def test_tensorboard_curves_grids_and_log_continue_across_a_resume(pix, tmp_path):
    """A crash after step 6 was logged but before its checkpoint: the resumed run's curves have each step once."""
    run = tmp_path / "run"
    common = ("--ckpt-every", "4", "--sample-every", "4", "--sample-grid", "4", "--sample-steps", "2")
    assert run_cli(trainer_main, train_args(pix, run, *common, steps=6)) == 0
    assert (run / "DONE").is_file() and names(run / "samples", "*.png") == ["step-0000000.png", "step-0000004.png"]
    (run / "checkpoints" / "0000006.pt").unlink()  # the lost part: steps 5-6 are in the tracker, not in a checkpoint
    (run / "export" / "ema-0000006.safetensors").unlink()
    lost = {e.step: e.value for e in events(run / "tb").Scalars("train/loss")}
    assert sorted(lost) == [1, 2, 3, 4, 5, 6]

    assert run_cli(trainer_main, train_args(pix, run, *common, steps=8)) == 0
    rows = stats(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    ea = events(run / "tb")
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))  # no duplicates, in order: the lost 5-6 were purged
    assert np.allclose([e.value for e in loss], [r["loss"] for r in rows], rtol=1e-6)
    numeric = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
    assert {f"train/{k}" for k in numeric} <= set(ea.Tags()["scalars"])  # every stats.jsonl scalar
    assert "train/sample_grid_s" in ea.Tags()["scalars"] and rows[0]["sample_grid_s"] > 0  # grid time reported
    assert [e.step for e in ea.Images("samples/ema")] == [0, 4, 8]
    assert names(run / "samples", "*.png") == ["step-0000000.png", "step-0000004.png", "step-0000008.png"]
    assert json.loads((run / "DONE").read_text())["step"] == 8

    log = (run / "log.txt").read_text()
    assert "\r" not in log and "resolved config: {" in log and "resumed from" in log and "0000004.pt" in log
    assert sum(" | loss " in ln for ln in log.splitlines()) == 6 + 4  # one line per log interval, both runs
    assert "saved" in log and "sample grid step-0000008.png" in log and "done (wrote DONE)" in log
    from PIL import Image
    with Image.open(run / "loss.png") as im:
        assert im.size[0] >= 800 and np.asarray(im.convert("L")).std() > 5


def test_same_noise_at_every_grid(pix, tmp_path):
    """Two grids of the same EMA weights are identical: fixed classes and fixed noise."""
    from trainer.loop.preview import Preview, grid_labels
    from trainer.sampling.job import load_model
    from trainer.sampling.config import parse
    run = tmp_path / "run"
    assert run_cli(trainer_main, train_args(pix, run, "--ckpt-every", "2", "--report-to", "none",
                                            "--sample-every", "0", steps=2)) == 0
    conf = json.loads((run / "config.json").read_text())
    lm = load_model(parse(["--ckpt", str(run / "checkpoints" / "0000002.pt"), "--out", str(tmp_path / "x")]))
    p = Preview(conf, 8, 3, torch.device("cpu"))
    a, b = p.grid(lm.model), p.grid(lm.model)
    assert np.array_equal(a, b) and a.shape == (2 * 64 + 2, 4 * 64 + 6, 3)  # one column per class
    assert grid_labels(8, 4) == [0, 1, 2, 3, 0, 1, 2, 3] and grid_labels(4, 1000) == [0, 250, 500, 750]


def test_retention_rule():
    steps = [1000 * i for i in range(1, 21)]
    assert kept_steps(steps, 3, 5000) == {5000, 10000, 15000, 18000, 19000, 20000}
    assert kept_steps(steps, 0, 0) == {20000}  # the newest is never deleted
    assert kept_steps(steps[:2], 3, 0) == {1000, 2000} and kept_steps([], 3, 5) == set()


@pytest.mark.slow
def test_kill_between_save_and_prune_loses_nothing_and_the_kept_set_is_the_rule(pix, tmp_path, capsys):
    run = tmp_path / "run"
    argv = train_args(pix, run, "--ckpt-every", "1", "--keep-last", "2", "--keep-every", "4", "--report-to", "none",
                      "--sample-every", "0", steps=6)
    p = subprocess.Popen([sys.executable, "-m", "trainer", *argv], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**ENV, "REPA_TEST_PAUSE_PRUNE": "5:120"})
    end = time.time() + 240
    while not (run / "export" / "ema-0000005.safetensors").exists():  # written after checkpoint 5, before pruning
        assert p.poll() is None and time.time() < end, p.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # Before pruning at 5 the set was {3, 4} (last 2, milestone 4); 5 is durable, so nothing may be missing.
    assert names(run / "checkpoints", "*.pt") == ["0000003.pt", "0000004.pt", "0000005.pt"]
    assert names(run / "export", "ema-*") == [f"ema-000000{s}.safetensors" for s in (3, 4, 5)]
    for s in (3, 4, 5):
        torch.load(run / "checkpoints" / f"000000{s}.pt", weights_only=True)
    assert run_cli(trainer_main, argv) == 0  # the re-run, in this process
    out = capsys.readouterr().out
    assert "resuming from" in out and "0000005.pt" in out
    assert names(run / "checkpoints", "*.pt") == ["0000004.pt", "0000005.pt", "0000006.pt"]  # last 2 + milestone
    assert names(run / "export", "ema-*") == [f"ema-000000{s}.safetensors" for s in (4, 5, 6)]


def test_resume_from_an_older_step_sets_newer_checkpoints_aside(pix, tmp_path, capsys):
    run = tmp_path / "run"
    base = train_args(pix, run, "--ckpt-every", "2", "--report-to", "none", "--sample-every", "0", steps=6)
    assert run_cli(trainer_main, base) == 0
    first6 = torch.load(run / "checkpoints" / "0000006.pt", weights_only=True)["model"]
    assert run_cli(trainer_main, base + ["--resume-from", "9"]) == 2
    err = capsys.readouterr().err
    assert "--resume-from 9" in err and "have: 2, 4, 6" in err
    assert run_cli(trainer_main, base + ["--resume-from", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "0000002.pt" in out
    assert names(run / "checkpoints" / "abandoned", "*.pt") == ["0000004.pt", "0000006.pt"]
    assert names(run / "export" / "abandoned", "*") == ["ema-0000004.safetensors", "ema-0000006.safetensors"]
    again = torch.load(run / "checkpoints" / "0000006.pt", weights_only=True)["model"]
    assert all(torch.equal(first6[k], again[k]) for k in first6)  # a resume is exact, from any checkpoint
    assert [r["step"] for r in stats(run)] == list(range(1, 7))


def test_report_to_wandb_without_wandb_is_one_line(pix, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    rc = run_cli(trainer_main, train_args(pix, tmp_path / "run", "--report-to", "wandb", steps=1))
    out, err = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess([], rc, out, err), "--report-to wandb", "pip install wandb")


def test_pixel_vae_round_trip_and_interface():
    """The latent is the 8x8 area average in a fixed colour basis; a flat colour decodes exactly; SD geometry."""
    from pipeline.encoders import load_vae, vae_meta, vae_moments
    from pipeline.pixel_vae import GAIN
    from trainer.sampling.output import decode
    vae = load_vae("pixel-vae")
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    crops = torch.from_numpy(blocks.repeat(8, axis=1).repeat(8, axis=2).copy())  # (2, 32, 32, 3) constant 8x8 blocks
    m = vae_moments(vae, crops)
    assert m.shape == (2, 8, 4, 4) and vae.config.latent_channels == 4
    rgb = torch.einsum("ck,nkhw->nchw", vae.inverse, m[:, :4]) * 0.18215 / GAIN  # back to the block colours
    want = torch.from_numpy(blocks).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(rgb, want, atol=1e-5)
    z = m[:, :4].double() * 0.18215  # what the trainer feeds the SiT: about unit scale, like SD latents
    assert 0.3 < float(z.std()) < 3
    flat = torch.full((1, 32, 32, 3), 0, dtype=torch.uint8)
    flat[..., 0], flat[..., 1], flat[..., 2] = 200, 40, 90
    img = decode(vae, vae_moments(vae, flat)[:, :4].double() * 0.18215, 0.18215, 0.0)  # (1, 32, 32, 3) uint8
    assert img.shape == (1, 32, 32, 3) and np.abs(img.astype(int) - [200, 40, 90]).max() <= 1
    assert vae_meta("pixel-vae")["pretrained"] is False and "analytic" in vae_meta("pixel-vae")["weights"]


@pytest.mark.slow
def test_watch_evaluates_each_export_once_and_resumes_after_a_failure(pix, tmp_path, monkeypatch, capsys):
    """--once rows for every export; a failure after sampling leaves no row; the re-run reuses the shards."""
    from PIL import Image

    import evaluation.job
    from evaluation.__main__ import main as evaluation_main
    from demo_data import synth_crops
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert run_cli(trainer_main, train_args(pix, run, "--ckpt-every", "2", "--sample-every", "0", steps=4)) == 0
    crops, labels = synth_crops(4, 4, 64, seed=1)
    for i, (im, c) in enumerate(zip(crops, labels)):
        (ref / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(ref / f"c{c}" / f"{i}.png")
    argv = ["watch", str(run), "--reference", str(ref), "--once", "--num-samples", "8", "--steps", "3",
            "--batch-size", "8", "--inception-weights", "random:0", "--eval-batch-size", "8", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]

    def broken(args):
        raise RuntimeError("killed while scoring")
    monkeypatch.setattr(evaluation.job, "main", broken)
    with pytest.raises(RuntimeError):
        evaluation_main(argv + ["--keep-samples"])
    assert not (run / "eval" / "metrics.jsonl").exists()  # a half-finished evaluation is not a row
    shards = sorted((run / "eval" / "work" / "0000002" / "samples" / "shards").glob("*.tar"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert shards
    monkeypatch.undo()

    assert run_cli(evaluation_main, argv + ["--keep-samples"]) == 0
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # finished sample shards were reused
    rows = [json.loads(x) for x in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["num_samples"] == 8 and r["fid"] > 0 and 0 <= r["precision"] <= 1 for r in rows)
    assert run_cli(evaluation_main, argv) == 0  # idempotent: nothing new to do
    assert len((run / "eval" / "metrics.jsonl").read_text().splitlines()) == 2
    assert [e.step for e in events(run / "tb" / "eval").Scalars("eval/fid")] == [2, 4]
    assert (run / "eval" / "fid.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
