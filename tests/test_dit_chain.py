"""DiT + DDPM end to end through the family registry, on the session's pipeline features (no new Ray cluster):
train DiT-Debug/2 + REPA (fp16: the GradScaler path), SIGKILL mid-checkpoint and resume bit-identical to an
uninterrupted run, sample with DDPM and DDIM (shards batch-size free, resumable), the FID watcher on the run; and a
released-layout DiT state dict (random weights, DiT's keys) loaded by NAME=PATH and by name from the torch hub cache,
sampled with both CFG channel rules, and put through the alignment analysis at integer timesteps."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from common import UserError, run_cli
from test_sampler_job import images, same_images
from trainer_common import args, ckpt, popen, same_state, small_feats, stats, wait_for  # noqa: F401

from trainer.__main__ import main as trainer_main

RELEASED = "DiT-XL-2-256x256.pt"
# 32x32 latents (256 px, like the released file's name says), 1000 classes + null, learned sigma: DiT's layout
RELEASED_KW = dict(input_size=32, num_classes=1000)
TRAIN = ("--model", "DiT-Debug/2", "--encoders", "tiny-dinov2", "--precision", "fp16")
FAST_SAMPLE = ["--num-steps", "4", "--shard-size", "3", "--num-samples", "6"]


def train_argv(feats: Path, run: Path, *extra: str, steps: int = 6) -> list[str]:
    return args(feats, run, *TRAIN, *extra, steps=steps, batch=4)


def sample(ckpt_: str | Path, out: Path, *extra: str) -> int:
    return run_cli(trainer_main, ["sample", "--ckpt", str(ckpt_), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def dit_run(tiny_features, tmp_path_factory) -> Path:
    """The uninterrupted reference: 6 steps, checkpoints every 2, an EMA grid at steps 0 and 4 (DDPM, 3 steps)."""
    run = tmp_path_factory.mktemp("dit") / "a"
    rc = run_cli(trainer_main, train_argv(tiny_features, run, "--sample-every", "4", "--sample-num-steps", "3",
                                          "--sample-num-samples", "4"))
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A plain state dict in DiT's released key layout (DiT-Debug/2 size), every weight perturbed off adaLN-Zero."""
    from trainer.models import DiT_models
    torch.manual_seed(3)
    m = DiT_models["DiT-Debug/2"](**RELEASED_KW)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("released") / "weights.pt"
    torch.save(m.state_dict(), path)
    return path


@pytest.mark.slow
def test_train_kill_resume_is_bit_identical_and_the_run_is_a_dit_run(dit_run, tiny_features, tmp_path, capsys):
    cfg = json.loads((dit_run / "config.json").read_text())
    assert cfg["model"] == "DiT-Debug/2" and cfg["model_kwargs"]["z_dims"] == [64] and cfg["path"] == "linear"
    assert sorted(p.name for p in (dit_run / "samples").glob("*.png")) == ["step-0000000.png", "step-0000004.png"]
    assert "3 ddpm steps" in (dit_run / "log.txt").read_text()
    rows = stats(dit_run)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["proj_loss"] != 0 for r in rows)  # the REPA term is on
    ema = ckpt(dit_run, 6)["ema"]
    assert ema["final_layer.linear.weight"].shape[0] == 2 * 2 * 2 * 4  # learned sigma: 2C channels per patch pixel

    b = tmp_path / "b"  # killed (SIGKILL) while checkpoint 4 is half-written, then the same command again
    p = popen(train_argv(tiny_features, b, "--sample-every", "4", "--sample-num-steps", "3",
                         "--sample-num-samples", "4"), env={"REPA_TEST_SLOW_CKPT": "4:120"})
    wait_for(lambda: any(x.name.startswith(".tmp-0000004.pt") for x in (b / "checkpoints").glob("*"))
             if (b / "checkpoints").is_dir() else False, 120, "checkpoint 4 tmp file", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (b / "checkpoints" / "0000004.pt").exists()
    capsys.readouterr()
    assert run_cli(trainer_main, train_argv(tiny_features, b, "--sample-every", "4", "--sample-num-steps", "3",
                                            "--sample-num-samples", "4")) == 0
    assert "0000002.pt" in capsys.readouterr().out  # resumed from the last complete checkpoint
    same_state(ckpt(dit_run, 6), ckpt(b, 6))  # weights, EMA, AdamW moments, GradScaler state, skip count
    assert [r["loss"] for r in stats(dit_run)] == [r["loss"] for r in stats(b)]
    assert [r["loss_scale"] for r in stats(dit_run)] == [r["loss_scale"] for r in stats(b)]


@pytest.mark.slow
def test_ddpm_and_ddim_samples_batch_free_and_resumable(dit_run, tmp_path):
    ref, small, ddim = tmp_path / "ref", tmp_path / "b2", tmp_path / "ddim"
    cfg = ["--cfg-scale", "2", "--guidance-high", "0.7"]
    assert sample(dit_run, ref, *FAST_SAMPLE, *cfg, "--batch-size", "6", "--npz") == 0
    m = json.loads((ref / "manifest.json").read_text())
    s = m["repa"]["sampler"]
    assert (s["mode"], s["steps"], s["nfe"], s["cfg_channels"], s["model"]) == ("ddpm", 4, 4, "all", "DiT-Debug/2")
    got = images(ref)
    assert len({im.tobytes() for im, _ in got.values()}) == 6
    with np.load(ref / "samples.npz") as z:
        assert z["arr_0"].shape == (6, 256, 256, 3) and np.array_equal(z["arr_0"][5], got[5][0])
    assert sample(dit_run, small, *FAST_SAMPLE, *cfg, "--batch-size", "2") == 0
    same_images(images(small), got, exact=False)  # per-sample generators: the batch layout changes nothing

    side = small / "shards" / "samples-000001.json"  # a shard whose sidecar never landed is redone, the other kept
    side.unlink()
    kept = (small / "shards" / "samples-000000.tar").stat().st_mtime_ns
    assert sample(dit_run, small, *FAST_SAMPLE, *cfg, "--batch-size", "2") == 0
    assert (small / "shards" / "samples-000000.tar").stat().st_mtime_ns == kept and side.is_file()
    same_images(images(small), got, exact=False)

    assert sample(dit_run, ddim, *FAST_SAMPLE, *cfg, "--mode", "ddim", "--batch-size", "6") == 0
    assert json.loads((ddim / "manifest.json").read_text())["repa"]["sampler"]["mode"] == "ddim"
    assert [c for _, c in images(ddim).values()] == [c for _, c in got.values()]  # same labels, other sampler
    from trainer.sampling.job import main as sample_main
    with pytest.raises(UserError, match="--mode sde: DiT samples with ddpm, ddim"):
        sample_main(["--ckpt", str(dit_run), "--out", str(tmp_path / "x"), *FAST_SAMPLE, "--mode", "sde"])


@pytest.mark.slow
def test_the_fid_watcher_samples_a_dit_run_with_its_sampler(dit_run, synth_dir, tmp_path):
    from evaluation.__main__ import main as evaluation_main
    run = tmp_path / "run"
    shutil.copytree(dit_run, run)
    argv = ["watch", str(run), "--reference", str(synth_dir), "--latest", "--num-samples", "6", "--steps", "2",
            "--batch-size", "6", "--inception-weights", "random:0", "--eval-batch-size", "8", "--device", "cpu",
            "--report-to", "none", "--cache-dir", str(tmp_path / "cache")]
    assert run_cli(evaluation_main, argv) == 0
    rows = [json.loads(x) for x in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6] and rows[0]["sampler"]["mode"] == "ddpm" and rows[0]["fid"] > 0


def test_a_released_layout_file_loads_by_name_and_samples_with_both_cfg_rules(released, tmp_path, monkeypatch):
    import trainer.models as models
    named = f"{RELEASED}={released}"
    lm = models.load_model(named, models.ModelSpec(model="DiT-Debug/2"))
    assert (lm.family.name, lm.name, lm.checkpoint.released, lm.built_from) == ("DiT", "DiT-Debug/2", RELEASED,
                                                                                "released defaults")
    assert lm.record.resolution == 256 and lm.model.num_classes == 1000 and lm.model.learn_sigma
    assert models.load_model(released).name == "DiT-Debug/2"  # unnamed: the family and size from the shapes
    with pytest.raises(UserError, match="not a released checkpoint name"):
        models.load_model(f"DiT-XL-2-999.pt={released}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"dl\.fbaipublicfiles\.com/DiT/models/DiT-XL-2-256x256\.pt"):
        models.load_model(RELEASED, models.ModelSpec(model="DiT-Debug/2"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(released, cache / RELEASED)  # where torch.hub keeps checkpoints
    assert models.load_model(RELEASED, models.ModelSpec(model="DiT-Debug/2")).checkpoint.path == cache / RELEASED

    out = {}
    for rule in ("all", "3"):
        out[rule] = tmp_path / rule
        assert sample(RELEASED, out[rule], "--model", "DiT-Debug/2", "--vae", "tiny-vae", "--num-samples", "2",
                      "--num-steps", "3", "--mode", "ddim", "--cfg-scale", "4", "--cfg-channels", rule) == 0
    a, b = images(out["all"]), images(out["3"])
    assert [c for _, c in a.values()] == [c for _, c in b.values()]
    assert any(not np.array_equal(a[i][0], b[i][0]) for i in a)  # guiding the 4th channel or not shows
    assert json.loads((out["3"] / "manifest.json").read_text())["repa"]["sampler"]["cfg_channels"] == "3"


@pytest.mark.slow
def test_align_runs_on_the_released_layout_at_integer_timesteps(released, tiny_features, tmp_path, capsys):
    from evaluation.align.cli import main as align_main
    from evaluation.align.model import hidden_states, load_model
    from trainer.models import ModelSpec
    from trainer.objectives.ddpm import noisy
    rc = run_cli(align_main, ["--ckpt", f"{RELEASED}={released}", "--model", "DiT-Debug/2", "--manifest",
                              str(tiny_features), "--out", str(tmp_path), "--t", "0.5", "--epochs", "2",
                              "--probe-batch-size", "8", "--batch-size", "8", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "alignment.json").read_text())
    assert rep["checkpoint"]["model"] == "DiT-Debug/2" and [r["layer"] for r in rep["layers"]] == [1, 2, 3, 4]
    assert all(-1 <= r["cknna"] <= 1 and 0 <= r["probe_top1"] <= 1 for r in rep["layers"])

    # The hooks see the forward at timestep 500 (t = 0.5), not at t = 0.5 itself.
    lm = load_model(f"{RELEASED}={released}", ModelSpec(model="DiT-Debug/2"), torch.device("cpu"))
    rng = np.random.default_rng(0)
    moments = np.concatenate([rng.standard_normal((2, 4, 32, 32)), np.full((2, 4, 32, 32), 0.1)], 1)
    pooled, _ = hidden_states(lm, moments.astype(np.float32), np.zeros(2, np.int64), layers=[2], t=0.5, scale=0.5,
                              shift=0.0, batch_size=2, seed=1, device=torch.device("cpu"), null_label=True)
    seen = {}
    lm.model.blocks[1].register_forward_hook(lambda m, i, o: seen.update(h=o.mean(1)))  # returns None: no edit
    mom = torch.from_numpy(moments.astype(np.float32))
    eps_post, eps = [], []
    for i in range(2):
        g = torch.Generator().manual_seed(1 * 1_000_003 + i)
        eps_post.append(torch.randn(4, 32, 32, generator=g))
        eps.append(torch.randn(4, 32, 32, generator=g))
    z = (mom[:, :4] + mom[:, 4:] * torch.stack(eps_post)) * 0.5
    with torch.no_grad():
        lm.model(noisy(z, 0.5, torch.stack(eps)), torch.full((2,), 500), torch.full((2,), 1000))
    torch.testing.assert_close(torch.from_numpy(pooled[2]), seen["h"])


@pytest.mark.slow
def test_two_ranks_equal_one_rank(small_feats, tmp_path, capsys):
    """DiT + DDPM under torchrun: 2 ranks (gloo) take disjoint halves of each global batch with the per-sample
    timesteps, noise and label drops of the 1-rank run, so losses and weights agree within float rounding."""
    import subprocess
    import sys

    from helpers import REPO, free_port
    from trainer_common import ENV, assert_weights_close, run_inproc

    def train(run: Path) -> list[str]:
        return args(small_feats, run, "--model", "DiT-Debug/2", "--lr", "1e-3", steps=4, batch=4)
    two, one = tmp_path / "two", tmp_path / "one"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), "-m", "trainer", *train(two)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rc, err = run_inproc(train(one), capsys)
    assert rc == 0, err
    assert json.loads((two / "config.json").read_text())["model"] == "DiT-Debug/2"
    np.testing.assert_allclose([r["loss"] for r in stats(two)], [r["loss"] for r in stats(one)], rtol=1e-5)
    assert_weights_close(ckpt(two, 4)["model"], ckpt(one, 4)["model"], steps=4)
