"""Text-to-image once on the S3 test server (issue 24): COCO images and annotations in a bucket -> extract to s3://
-> train MMDiT from the s3:// manifest into an s3:// run -> sample from an s3:// prompt file -> evaluate; each output
equals the same chain on local disk (shards byte for byte, weights bit for bit, images and metrics exactly)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import run_cli
from manifests import iter_shard, load_manifest, storage
from test_t2i_pipeline import TINY, extract_inprocess, write_coco

from trainer.__main__ import main as trainer_main


def _upload(local: Path, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            (storage.path(url) / p.relative_to(local).as_posix()).upload(p)


def _chain(images: str, captions: str, feats: str, run: str, prompts: str, samples: str, report: str) -> None:
    extract_inprocess(source=images, captions=captions, out=feats, **TINY)
    train = ["train", "--manifest", feats, "--run-dir", run, "--model", "MMDiT-Debug/2", "--encoders", "tiny-dinov2",
             "--batch-size", "4", "--steps", "2", "--ckpt-every", "2", "--precision", "fp32", "--num-workers", "0",
             "--report-to", "none", "--sample-every", "0"]
    assert run_cli(trainer_main, train) == 0
    assert run_cli(trainer_main, ["sample", "--ckpt", run, "--out", samples, "--prompts", prompts, "--num-samples",
                                  "3", "--num-steps", "2", "--cfg-scale", "2", "--vae", "tiny-vae"]) == 0
    from evaluation.__main__ import main as eval_main
    assert run_cli(eval_main, ["--samples", samples, "--reference", feats, "--metrics", "fid", "--clip-model",
                               "tiny-clip", "--inception-weights", "random:0", "--no-cache", "--batch-size", "4",
                               "--out", report, "--no-progress"]) == 0


@pytest.mark.slow
def test_t2i_chain_on_s3_equals_local(s3_bucket, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("REPA_REMOTE_CACHE", str(tmp_path / "mirror"))
    images, ann = write_coco(tmp_path / "coco")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square on the left\nan orange star\n")
    _upload(tmp_path / "coco", f"{s3_bucket}/coco")
    (storage.path(f"{s3_bucket}/prompts.txt")).upload(prompts)
    loc = tmp_path / "local"
    _chain(str(images), str(ann), str(loc / "feat"), str(loc / "run"), str(prompts), str(loc / "samples"),
           str(loc / "report.json"))
    b = s3_bucket
    _chain(f"{b}/coco/train2014", f"{b}/coco/annotations/captions_train2014.json", f"{b}/feat", f"{b}/run",
           f"{b}/prompts.txt", f"{b}/samples", f"{b}/report.json")
    ml, mr = load_manifest(loc / "feat"), load_manifest(f"{b}/feat")
    assert [e.sha256 for e in ml.shardlist] == [e.sha256 for e in mr.shardlist]  # shards byte for byte
    assert storage.path(f"{b}/feat/context_empty.npy").read_bytes() == (loc / "feat" / "context_empty.npy").read_bytes()
    a = torch.load(loc / "run" / "checkpoints" / "0000002.pt", weights_only=True)
    r = torch.load(io.BytesIO(storage.path(f"{b}/run/checkpoints/0000002.pt").read_bytes()), weights_only=True)
    assert all(torch.equal(a["model"][k], r["model"][k]) for k in a["model"])
    sl = [s for u in load_manifest(loc / "samples").shard_paths() for s in iter_shard(u)]
    sr = [s for u in load_manifest(f"{b}/samples", kind="samples").shard_paths() for s in iter_shard(u)]
    assert [s["txt"] for s in sl] == [s["txt"] for s in sr] and len(sl) == 3
    assert all(np.array_equal(x["png"], y["png"]) for x, y in zip(sl, sr))
    ra = json.loads((loc / "report.json").read_text())["metrics"]
    rb = json.loads(storage.path(f"{b}/report.json").read_text())["metrics"]
    assert ra == rb and "clip_score" in ra
