"""The trainer's GPU paths, checked on CPU: compiled == eager, results independent of ranks and micro-batches,
--micro-batch auto under a memory budget, and the per-sample randomness they rest on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, free_port, make_features_manifest
from manifests import run_cli

from trainer.__main__ import main as trainer_main
from trainer.steprng import StepRandom, flip_bits

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def args(manifest, run, *extra: str, steps: int = 3, batch: int = 4) -> list[str]:
    return ["train", "--manifest", str(manifest), "--run-dir", str(run), "--model", "SiT-Debug/2",
            "--batch-size", str(batch), "--steps", str(steps), "--ckpt-every", str(steps), "--log-every", "1",
            "--precision", "fp32", "--num-workers", "0", "--lr", "1e-3", *extra]


def losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run) / "stats.jsonl").read_text().splitlines()]


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return torch.load(Path(run) / "checkpoints" / f"{step:07d}.pt", weights_only=True)["model"]


def assert_weights_close(a: dict, b: dict, steps: int, lr: float = 1e-3) -> None:
    """Every weight within 1e-3 of the largest possible Adam travel (lr per step): rounding, not other noise.

    Runs with different randomness differ by about lr per step; Adam's g/sqrt(v) magnifies rounding only where
    a gradient is near its eps, which stays far below this bound.
    """
    bound = 1e-3 * lr * steps
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        assert diff <= bound, (k, diff, bound)


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpufeat")
    make_features_manifest(root, num=16, classes=4, shard_size=8, hflip=True)
    return root


@pytest.fixture(scope="module")
def small_feats(tmp_path_factory) -> Path:
    """8x8 latents (16 tokens at patch 2): the smallest graph, for the compile test."""
    root = tmp_path_factory.mktemp("smallfeat")
    make_features_manifest(root, num=8, classes=4, shard_size=8, latent_shape=(8, 8, 8), tokens=16)
    return root


def test_step_randomness_is_per_global_sample():
    """Rows of the global draw do not depend on who draws them; flips hash the global position."""
    a = StepRandom(seed=3, batch=8, shape=(4, 2, 2), drop_prob=0.5, device=torch.device("cpu"))
    b = StepRandom(seed=3, batch=8, shape=(4, 2, 2), drop_prob=0.5, device=torch.device("cpu"))
    n0, n1 = a.draw(5), b.draw(5)
    for f in ("t", "eps", "post", "drop"):
        assert torch.equal(getattr(n0.rows(4, 2), f), getattr(n1, f)[4:6])
    assert not torch.equal(a.draw(6).eps, n0.eps)  # another step, other noise
    assert not torch.equal(StepRandom(4, 8, (4, 2, 2), 0.5, torch.device("cpu")).draw(5).eps, n0.eps)
    assert 0 < int(n0.drop.sum()) < 8
    pos = np.arange(1000, 1064)
    bits = flip_bits(0, pos)
    assert np.array_equal(bits[10:20], flip_bits(0, pos[10:20])) and 16 < bits.sum() < 48
    assert not np.array_equal(bits, flip_bits(1, pos))


def test_micro_batch_sizes_agree(feats, tmp_path, capsys):
    """Grad accumulation over 1 or 4 images per pass: the same losses and weights up to float rounding."""
    runs = {}
    for micro in ("4", "1"):
        run = tmp_path / f"m{micro}"
        rc = run_cli(trainer_main, args(feats, run, "--hflip", "--micro-batch", micro, steps=2))
        assert rc == 0, capsys.readouterr().err
        runs[micro] = run
        assert json.loads((run / "stats.jsonl").read_text().splitlines()[-1])["micro_batch"] == int(micro)
    np.testing.assert_allclose(losses(runs["1"]), losses(runs["4"]), rtol=1e-5)
    assert_weights_close(weights(runs["1"], 2), weights(runs["4"], 2), steps=2)


@pytest.mark.slow
def test_two_ranks_equal_one_rank(feats, tmp_path):
    """torchrun with 2 gloo ranks and a 1-process run of the same global batch: same losses and weights. The ranks
    take disjoint halves of each global batch, end with identical weights, and keep their own RNG state."""
    from trainer.data import StepSampler
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(trainer_main, args(feats, one, "--hflip")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "trainer", *args(feats, two, "--hflip", "--trace-data")]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    assert_weights_close(weights(two, 3), weights(one, 3), steps=3)
    tr = [[json.loads(x) for x in (two / "trace" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    keys = lambda rows, step: [k for row in rows if row.get("step") == step and "keys" in row  # noqa: E731
                               for k in row["keys"]]
    batches = [ids for _, _, ids in StepSampler(16, 4, 0, 1, 4, 0, 0, 3)]  # the single-process global batches
    for step in range(3):
        k0, k1 = keys(tr[0], step), keys(tr[1], step)
        assert len(k0) == len(k1) == 2 and not set(k0) & set(k1)  # disjoint halves ...
        assert k0 + k1 == [f"img{i:05d}" for i in batches[step]]  # ... of the same global batch
    assert tr[0][-1]["params_sha256"] == tr[1][-1]["params_sha256"]  # identical weights on both ranks
    rng = torch.load(two / "checkpoints" / "0000003.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])
    assert json.loads((two / "stats.jsonl").read_text().splitlines()[-1])["img_per_s"] > 0


def test_micro_batch_auto_under_a_budget(feats, tmp_path, capsys, monkeypatch):
    """A budget too small for the whole per-rank batch: auto picks a smaller micro-batch, recorded everywhere,
    and the run equals an explicit --micro-batch run of that size."""
    from trainer.microbatch import HEADROOM
    big = tmp_path / "big"
    assert run_cli(trainer_main, args(feats, big, batch=4, steps=1)) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("micro-batch auto: 4 of"))
    state = float(line.split("state ")[1].split()[0])
    need = float(line.split("needs ")[1].split()[0])
    # Room for the state and about 60% of the activations of 4 images: 2 fit, 4 do not.
    budget = (state + 0.6 * (need - state)) / HEADROOM
    monkeypatch.setenv("REPA_MEMORY_BUDGET_GB", f"{budget:.6f}")
    auto = tmp_path / "auto"
    assert run_cli(trainer_main, args(feats, auto, batch=4, steps=2)) == 0
    out = capsys.readouterr().out
    assert "micro-batch auto: 2 of the per-rank batch 4" in out, out
    assert json.loads((auto / "config.json").read_text())["micro_batch"] == 2
    assert json.loads((auto / "config.json").read_text())["train"]["micro_batch"] == "auto"
    assert all(json.loads(x)["micro_batch"] == 2 for x in (auto / "stats.jsonl").read_text().splitlines())
    monkeypatch.delenv("REPA_MEMORY_BUDGET_GB")
    fixed = tmp_path / "fixed"
    assert run_cli(trainer_main, args(feats, fixed, "--micro-batch", "2", batch=4, steps=2)) == 0
    assert losses(auto) == losses(fixed)
    wa, wf = weights(auto, 2), weights(fixed, 2)
    assert all(torch.equal(wa[k], wf[k]) for k in wa)
    # A budget below the training state itself is a one-line user error.
    monkeypatch.setenv("REPA_MEMORY_BUDGET_GB", f"{state / 4:.6f}")
    assert run_cli(trainer_main, args(feats, tmp_path / "tiny", batch=4, steps=2)) == 2
    err = capsys.readouterr().err
    assert "REPA_MEMORY_BUDGET_GB" in err and "even one image per pass" in err, err


@pytest.mark.slow
def test_compiled_losses_equal_eager(small_feats, tmp_path, capsys):
    """`--compile` (inductor, CPU) and `--no-compile` see the same randomness: per-step losses within 1e-4."""
    runs = {}
    for flag in ("--no-compile", "--compile"):
        run = tmp_path / flag.strip("-")
        rc = run_cli(trainer_main, args(small_feats, run, flag, "--enc-depth", "1", batch=2, steps=3))
        assert rc == 0, capsys.readouterr().err
        runs[flag] = losses(run)
        assert f"torch.compile {'on' if flag == '--compile' else 'off'}" in capsys.readouterr().out
    np.testing.assert_allclose(runs["--compile"], runs["--no-compile"], rtol=1e-4)
    assert len(set(runs["--compile"])) == 3  # three different steps, not one repeated value


def test_sampler_bf16_casts_weights_once_with_autocast_numbers():
    """--precision bf16: weights cast once, and the velocity equals per-call bf16 autocast of the fp32 model."""
    import copy
    from trainer.models import SiT_models
    from trainer.sample import Velocity
    torch.manual_seed(0)
    model = SiT_models["SiT-Debug/2"](input_size=8, num_classes=4, z_dims=[]).eval()
    for p in model.parameters():  # the zero-initialised adaLN/final layers would make every output 0
        p.data.normal_(0, 0.05) if p.requires_grad else None
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 4])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, t, y=y)[0].float()
    fast = Velocity(copy.deepcopy(model), torch.device("cpu"), "bf16", compile_=False)
    assert fast.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16  # cast once, at construction
    assert fast.model.pos_embed.dtype == torch.float32  # the residual stream is not narrowed
    with torch.no_grad():
        got = fast(x, t, y)[0]
    assert float(ref.abs().max()) > 0 and torch.equal(got, ref)
