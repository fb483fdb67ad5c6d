"""Exact resume in every mode: SIGKILL mid-checkpoint, SIGTERM, fp16 scaler state, other workers, 2 ranks."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, free_port
from common import run_cli
from trainer_common import (ENV, args, assert_weights_close, ckpt, feats, popen, run_inproc,  # noqa: F401
                            same_state, small_feats, stats, wait_for)

from trainer.__main__ import main as trainer_main


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_then_rerun_is_bit_identical(feats, tmp_path, capsys):
    """Kill -9 between the tmp write and the rename of checkpoint 6: 4 stays loadable, the re-run matches."""
    a_run, b_run = tmp_path / "a", tmp_path / "b"
    common = ["--num-workers", "1", "--hflip"]
    assert run_cli(trainer_main, args(feats, a_run, *common, steps=8)) == 0  # the uninterrupted reference
    b = popen(args(feats, b_run, *common, steps=8), env={"REPA_TEST_SLOW_CKPT": "6:120"})
    tmp_seen = lambda: any(p.name.startswith(".tmp-0000006.pt") for p in (b_run / "checkpoints").glob("*"))  # noqa: E731
    wait_for(lambda: (b_run / "checkpoints").is_dir() and tmp_seen(), 120, "checkpoint 6 tmp file", b)
    b.send_signal(signal.SIGKILL)
    b.wait()
    assert not (b_run / "checkpoints" / "0000006.pt").exists()
    assert ckpt(b_run, 4)["step"] == 4  # the previous checkpoint is intact and loads with weights_only=True
    capsys.readouterr()
    assert run_cli(trainer_main, args(feats, b_run, *common, steps=8)) == 0  # the re-run: the same command
    out = capsys.readouterr().out
    assert "resuming from" in out and "0000004.pt" in out
    assert not any(x.name.startswith(".tmp-") for x in (b_run / "checkpoints").iterdir())
    ca, cb = ckpt(a_run, 8), ckpt(b_run, 8)
    for part in ("model", "ema"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    assert all(torch.equal(ca["opt"]["state"][i]["exp_avg_sq"], cb["opt"]["state"][i]["exp_avg_sq"])
               for i in ca["opt"]["state"])
    assert [r["step"] for r in stats(b_run)] == list(range(1, 9))  # the lost run's rows were trimmed
    assert [r["loss"] for r in stats(a_run)] == [r["loss"] for r in stats(b_run)]
    from safetensors.torch import load_file
    ema = load_file(b_run / "export" / "ema-0000008.safetensors")
    assert all(torch.equal(ema[k], ca["ema"][k]) for k in ema)
    cfg = json.loads((b_run / "export" / "config.json").read_text())
    assert cfg["model"] == "SiT-Debug/2" and cfg["model_kwargs"]["z_dims"] == [64]
    from trainer.models import SiT_models
    SiT_models[cfg["model"]](**cfg["model_kwargs"]).load_state_dict(ema, strict=True)
    assert (b_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_exits_zero(feats, tmp_path):
    run = tmp_path / "run"
    p = popen(args(feats, run, steps=100000) + ["--ckpt-every", "100000", "--sample-every", "0"])  # no step-0 grid
    wait_for(lambda: (run / "stats.jsonl").exists() and len(stats(run)) >= 2, 120, "two steps", p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    saved = sorted((run / "checkpoints").glob("*.pt"))
    assert len(saved) == 1 and "SIGTERM" in err
    step = ckpt(run, int(saved[0].stem))["step"]
    assert 2 <= step < 100000 and stats(run)[-1]["step"] == step


@pytest.mark.parametrize("mode", ["fp16-skips", "workers-change"])
def test_resume_is_bit_identical(small_feats, tmp_path, capsys, mode):
    """fp16: the GradScaler's scale and growth tracker and the skipped-step count survive a resume (init scale 2^40
    makes the first steps overflow). workers-change: a resume with other --num-workers (allowed) changes nothing."""
    if mode == "fp16-skips":
        first, then = ["--precision", "fp16", "--loss-scale-init", str(2.0 ** 40)], None
    else:
        first, then = ["--num-workers", "0"], ["--num-workers", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_inproc(args(small_feats, a, *first, steps=6, batch=2), capsys)[0] == 0
    assert run_inproc(args(small_feats, b, *first, steps=3, batch=2), capsys)[0] == 0
    rc = run_cli(trainer_main, args(small_feats, b, *(then or first), steps=6, batch=2))
    assert rc == 0 and "resuming from" in capsys.readouterr().out
    ca, cb = ckpt(a, 6), ckpt(b, 6)
    same_state(ca, cb)
    assert [r["loss"] for r in stats(a)] == [r["loss"] for r in stats(b)]
    if mode == "fp16-skips":
        assert ckpt(b, 3)["skipped"] >= 1 and cb["scaler"]["scale"] < 2.0 ** 40  # skips happened before the kill
        assert [r["loss_scale"] for r in stats(a)] == [r["loss_scale"] for r in stats(b)]


def test_resume_refuses_each_setting_the_readme_names(small_feats, tmp_path, capsys):
    """Model, path, encoders, batch size, seed, objective, lambda, hflip and precision (and the model's geometry)
    may not change on resume: one line naming the setting, exit 2, and the run folder is untouched."""
    run = tmp_path / "run"
    assert run_inproc(args(small_feats, run, steps=2, batch=2), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())}
    stats_before = (run / "stats.jsonl").read_bytes()
    changes = [(["--model", "SiT-S/2"], "'model'"), (["--path", "cosine"], "'path'"),
               (["--encoders", "none"], "'encoders'"), (["--seed", "1"], "'train.seed'"),
               (["--proj-loss", "ntxent"], "'train.proj_loss'"), (["--proj-coeff", "0.25"], "'train.proj_coeff'"),
               (["--hflip"], "'train.hflip'"), (["--precision", "bf16"], "'train.precision'"),
               (["--enc-depth", "1"], "'model_kwargs'")]
    for extra, needle in changes:
        rc, err = run_inproc(args(small_feats, run, steps=4, batch=2) + extra, capsys)
        line = err.strip().splitlines()[-1]
        assert rc == 2 and line.startswith("error: run folder") and needle in line, (extra, err)
    rc, err = run_inproc(args(small_feats, run, steps=4, batch=4), capsys)
    assert rc == 2 and "'train.batch_size'" in err
    assert {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())} == before
    assert (run / "stats.jsonl").read_bytes() == stats_before


@pytest.mark.slow
def test_two_rank_torchrun_killed_and_resumed_is_bit_identical(small_feats, tmp_path, capsys):
    """2 ranks (gloo): SIGKILL the whole torchrun group while checkpoint 4 is half-written; the re-run resumes
    from 2 and ends bit-identical to an uninterrupted 2-rank run (weights, optimiser, every rank's RNG, stats).

    The uninterrupted run also equals a 1-process run of the same global batch (losses, weights) within float
    rounding: its ranks take disjoint halves of each global batch and end with identical weights.
    """
    from helpers import kill_group, kill_marked
    from trainer.data.index import StepSampler

    def train(run: Path) -> list[str]:
        return args(small_feats, run, "--hflip", "--trace-data", "--lr", "1e-3", steps=6, batch=4)

    def torchrun(run: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), "-m", "trainer", *train(run)]
    a, b, one = tmp_path / "a", tmp_path / "b", tmp_path / "one"
    p = subprocess.run(torchrun(a), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    # 2 ranks == 1 rank: the same global batches and per-sample randomness, so only float rounding differs.
    rc, err = run_inproc(train(one), capsys)
    assert rc == 0, err
    np.testing.assert_allclose([r["loss"] for r in stats(a)], [r["loss"] for r in stats(one)], rtol=1e-5)
    assert_weights_close(ckpt(a, 6)["model"], ckpt(one, 6)["model"], steps=6)
    tr = [[json.loads(x) for x in (a / "trace" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    batches = [ids for _, _, ids in StepSampler(16, 4, 0, 1, 4, 0, 0, 6)]  # the single-process global batches
    for step in range(6):
        k0, k1 = ([k for row in rows if row.get("step") == step and "keys" in row for k in row["keys"]] for rows in tr)
        assert len(k0) == len(k1) == 2 and k0 + k1 == [f"img{i:05d}" for i in batches[step]]  # disjoint halves
    assert tr[0][-1]["params_sha256"] == tr[1][-1]["params_sha256"]  # identical weights on both ranks
    # Killed mid-checkpoint 4, then re-run: bit-identical to the uninterrupted 2-rank run.
    with open(tmp_path / "b.log", "w") as log:
        k = subprocess.Popen(torchrun(b), cwd=REPO, env={**ENV, "REPA_TEST_SLOW_CKPT": "4:120"},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: any(x.name.startswith(".tmp-0000004.pt") for x in (b / "checkpoints").glob(".tmp-*")),
                     180, "checkpoint 4 tmp file", k)
        finally:
            # The launcher and both ranks, as a lost node would. torchrun starts each rank in its own session, so
            # the launcher's group alone would leave them running to finish checkpoint 4 behind the re-run's back.
            kill_group(k.pid)
            k.wait()
            kill_marked(str(b))
    assert k.returncode == -signal.SIGKILL and not (b / "checkpoints" / "0000004.pt").exists()
    p = subprocess.run(torchrun(b), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout and "0000002.pt" in p.stdout
    ca, cb = ckpt(a, 6), ckpt(b, 6)
    same_state(ca, cb)
    assert len(cb["rng"]) == 2 and all(torch.equal(x["cpu"], y["cpu"]) for x, y in zip(ca["rng"], cb["rng"]))
    assert not torch.equal(ca["rng"][0]["cpu"], ca["rng"][1]["cpu"])  # each rank keeps its own RNG state
    assert [r["loss"] for r in stats(a)] == [r["loss"] for r in stats(b)]
