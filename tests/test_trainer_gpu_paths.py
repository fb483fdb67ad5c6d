"""The trainer's GPU paths, checked on CPU: compiled == eager, results independent of micro-batches (of ranks:
test_trainer_resume.py's 2-rank test), --micro-batch auto under a memory budget, and the per-step randomness."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_features_manifest
from common import run_cli
from trainer_common import assert_weights_close

from trainer.__main__ import main as trainer_main
from trainer.loop.steprng import StepRandom, flip_bits

def args(manifest, run, *extra: str, steps: int = 3, batch: int = 4) -> list[str]:
    return ["train", "--manifest", str(manifest), "--run-dir", str(run), "--model", "SiT-Debug/2",
            "--batch-size", str(batch), "--steps", str(steps), "--ckpt-every", str(steps), "--log-every", "1",
            "--precision", "fp32", "--num-workers", "0", "--lr", "1e-3", *extra]


def losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run) / "stats.jsonl").read_text().splitlines()]


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return torch.load(Path(run) / "checkpoints" / f"{step:07d}.pt", weights_only=True)["model"]


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
    """A sample's draws are a function of (seed, step, global row) alone: the rows a rank keeps are the rows of the
    one global draw at its offset, whatever was drawn before; flips hash the global position.
    (The old version compared two identical objects' slices with each other. Planted bugs it now catches: `rows()`
    slicing from 0 instead of `start`; `draw()` not re-seeding per step.)"""
    from trainer.loop.steprng import step_seed
    a = StepRandom(seed=3, batch=8, shape=(4, 2, 2), drop_prob=0.5, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(step_seed(3, 5))  # the global draw of step 5, made by hand
    t, eps = torch.rand(8, generator=g), torch.randn((8, 4, 2, 2), generator=g)
    a.draw(9)  # an earlier draw must not leak into step 5
    n0 = a.draw(5)
    mine = n0.rows(4, 2)  # rank 1 of 2, or micro-batch 2 of 4: global rows 4 and 5
    assert torch.equal(mine.t, t[4:6]) and torch.equal(mine.eps, eps[4:6])
    assert torch.equal(a.draw(5).post, n0.post) and not torch.equal(a.draw(6).eps, n0.eps)
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


def test_micro_batch_gradients_agree(feats, tmp_path, capsys):
    """The gradient of one accumulated step is the same for 1 or 4 images per pass. Adam's first moment after
    step 1 is (1 - beta1) * grad, so the checkpoint shows the gradient itself; weights alone cannot, because Adam
    divides a constant factor away. (Planted bug this catches and the weights test did not: the accumulation
    factor `n / r.local_batch` in trainer/loop/train.py replaced by 1.)"""
    moments = {}
    for micro in ("4", "1"):
        run = tmp_path / f"g{micro}"
        assert run_cli(trainer_main, args(feats, run, "--hflip", "--micro-batch", micro, steps=1)) == 0, \
            capsys.readouterr().err
        opt = torch.load(run / "checkpoints" / "0000001.pt", weights_only=True)["opt"]["state"]
        moments[micro] = [opt[i]["exp_avg"] for i in sorted(opt)]
    assert len(moments["1"]) > 4
    for a, b in zip(moments["1"], moments["4"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_micro_batch_auto_under_a_budget(feats, tmp_path, capsys, monkeypatch):
    """A budget too small for the whole per-rank batch: auto picks a smaller micro-batch, recorded everywhere,
    and the run equals an explicit --micro-batch run of that size."""
    from trainer.loop.microbatch import HEADROOM
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
    conf = json.loads((auto / "config.json").read_text())  # the choice under "resolved", the request under "train"
    assert conf["resolved"]["micro_batch"] == 2 and conf["resolved"]["loader"] == "indexed"
    assert conf["train"]["micro_batch"] == "auto"
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
    import torch._inductor.config as inductor_config
    runs = {}
    for flag in ("--no-compile", "--compile"):
        run = tmp_path / flag.strip("-")
        # Kernels compiled in this process: the suite keeps every core busy, so a compile pool would only add the
        # start-up of its workers. The kernels are the same.
        with inductor_config.patch(compile_threads=1):
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
    from trainer.sampling.job import Velocity
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
