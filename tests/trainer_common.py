"""Shared by the trainer's run and resume tests: argv builders, readers of a run folder, two feature sets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, make_features_manifest
from common import run_cli

from trainer.__main__ import main as trainer_main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def args(manifest, run, *extra: str, steps: int = 6, batch: int = 4) -> list[str]:
    return ["train", "--manifest", str(manifest), "--run-dir", str(run), "--model", "SiT-Debug/2",
            "--batch-size", str(batch), "--steps", str(steps), "--ckpt-every", "2", "--log-every", "1",
            "--precision", "fp32", "--num-workers", "0", *extra]


def assert_weights_close(a: dict, b: dict, steps: int, lr: float = 1e-3) -> None:
    """Every weight within 1e-3 of the largest possible Adam travel (lr per step): rounding, not other noise.

    Runs with different randomness differ by about lr per step; Adam's g/sqrt(v) magnifies rounding only where
    a gradient is near its eps, which stays far below this bound.
    """
    bound = 1e-3 * lr * steps
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        assert diff <= bound, (k, diff, bound)


def run_inproc(argv: list[str], capsys) -> tuple[int, str]:
    rc = run_cli(trainer_main, argv)
    return rc, capsys.readouterr().err


def stats(run) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "stats.jsonl").read_text().splitlines()]


def ckpt(run, step) -> dict:
    return torch.load(Path(run) / "checkpoints" / f"{step:07d}.pt", weights_only=True)


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trainfeat")
    make_features_manifest(root, num=16, classes=4, shard_size=8, hflip=True)
    return root


def popen(argv: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", *argv], cwd=REPO, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def small_feats(tmp_path_factory) -> Path:
    """16x16 latents (64 tokens): the same code paths as the 32x32 set at a quarter of the cost per step."""
    root = tmp_path_factory.mktemp("smallfeat")
    make_features_manifest(root, num=16, classes=4, shard_size=8, latent_shape=(8, 16, 16), tokens=64, hflip=True)
    return root


def same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical model, EMA, optimiser and scaler state and the same skip count."""
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for i, st in a["opt"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], b["opt"]["state"][i][k]), (i, k)
    assert a["scaler"] == b["scaler"] and a["skipped"] == b["skipped"] and a["step"] == b["step"]
