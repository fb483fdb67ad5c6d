"""Train -> sample -> evaluate with every folder and file on a real S3 server (moto over HTTP)."""
from __future__ import annotations

import io
import json

import numpy as np
import torch

from helpers import make_features_manifest
from manifests import load_manifest, storage
from common import run_cli


def test_train_sample_evaluate_on_s3(s3_bucket, tmp_path, monkeypatch, capsys):
    """--run-dir, --ckpt, --out, --samples, --reference, report and evaluation cache all as s3:// URLs."""
    from evaluation.__main__ import main as eval_main
    from trainer.__main__ import main as trainer_main
    from trainer.sampling.job import main as sample_main
    torch.set_num_threads(1)
    monkeypatch.setenv("REPA_REMOTE_CACHE", str(tmp_path / "mirror1"))
    feats, run = f"{s3_bucket}/feats", f"{s3_bucket}/run"
    make_features_manifest(feats, num=8, classes=2, shard_size=4, latent_shape=(8, 8, 8), tokens=16)
    train = ["train", "--manifest", feats, "--run-dir", run, "--model", "SiT-Debug/2", "--batch-size", "4",
             "--ckpt-every", "2", "--log-every", "1", "--precision", "fp32", "--num-workers", "0"]
    assert run_cli(trainer_main, [*train, "--steps", "2"]) == 0, capsys.readouterr().err
    names = {str(o.relative_to(storage.path(run))) for o, _ in storage.path(run).find()}
    assert {"checkpoints/0000002.pt", "config.json", "export/config.json"} <= names, names
    # Another machine (an empty local mirror) re-runs the same command with more steps: it resumes from the bucket.
    monkeypatch.setenv("REPA_REMOTE_CACHE", str(tmp_path / "mirror2"))
    capsys.readouterr()
    assert run_cli(trainer_main, [*train, "--steps", "4"]) == 0
    # The resume check used to be or-ed with the next assert, so a run restarting from step 0 passed. Planted bug
    # this catches: remote_run.pull() fetching no checkpoint (-> "resuming from" missing, weights differ).
    out = capsys.readouterr()
    assert "(step 2)" in out.out + out.err and "resuming from" in out.out + out.err, out.out[-2000:]
    monkeypatch.setenv("REPA_REMOTE_CACHE", str(tmp_path / "mirror_full"))
    full = f"{s3_bucket}/run_full"  # the same 4 steps without an interruption
    assert run_cli(trainer_main, [*train[:train.index("--run-dir") + 1], full,
                                  *train[train.index("--run-dir") + 2:], "--steps", "4"]) == 0
    a = torch.load(io.BytesIO(storage.path(f"{run}/checkpoints/0000004.pt").read_bytes()), weights_only=True)
    b = torch.load(io.BytesIO(storage.path(f"{full}/checkpoints/0000004.pt").read_bytes()), weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # resumed == uninterrupted

    samples = f"{s3_bucket}/samples"
    assert run_cli(sample_main, ["--ckpt", run, "--out", samples, "--steps", "2", "--shard-size", "4",
                                 "--num-samples", "8", "--batch-size", "8", "--npz"]) == 0, capsys.readouterr().err
    m = load_manifest(samples, kind="samples", verify=True)
    assert m.num_samples == 8 and m.extra["checkpoint"]["path"] == run
    assert storage.path(f"{samples}/samples.npz").is_file() and storage.path(f"{samples}/grid.png").is_file()

    report, cache = f"{s3_bucket}/eval/report.json", f"{s3_bucket}/eval/cache"
    argv = ["--samples", samples, "--reference", f"{samples}/samples.npz", "--out", report, "--cache-dir", cache,
            "--inception-weights", "random:0", "--no-progress", "--batch-size", "4", "--num-workers", "1"]
    assert run_cli(eval_main, argv) == 0, capsys.readouterr().err
    rep = json.loads(storage.path(report).read_text())
    assert rep["settings"]["samples"] == samples and rep["samples"]["cache"] == "miss"
    assert abs(rep["metrics"]["fid"]) < 1e-3  # the npz holds the very same images as the shards
    assert any(o.name.endswith(".h5") for o, _ in storage.path(cache).find())  # the cache went to the bucket
    monkeypatch.setenv("REPA_REMOTE_CACHE", str(tmp_path / "mirror3"))  # a fresh machine: cache from the bucket
    assert run_cli(eval_main, argv) == 0
    rep2 = json.loads(storage.path(report).read_text())
    assert rep2["samples"]["cache"] == "hit" and np.isclose(rep2["metrics"]["fid"], rep["metrics"]["fid"])
