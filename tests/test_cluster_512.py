"""512 px end to end on a real Ray cluster, driven by REPA's own flag names.

`ray start --head` (free ports, token auth) and `ray job submit --working-dir .` run `pipeline extract` at 512 px
(64x64 latents, 32x32 token grids) with two encoders (tiny DINOv2, and CLIP from an OpenAI-layout file), --hflip,
and bad inputs next to good ones -> train SiT-Debug/2 on both encoders (`--enc-type a,b`, REPA's comma list) ->
sample -> evaluate against the source images ADM-cropped to 512 px. After the job, the CLI mains run in this
process (same argv, same code).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, free_ports, kill_group, kill_marked
from manifests import iter_shard, load_manifest
from common import run_cli

from evaluation.__main__ import main as evaluation_main
from trainer.__main__ import main as trainer_main


def _openai_clip_file(path) -> None:
    """A tiny CLIP in OpenAI's plain state-dict layout (open_clip's class, QuickGELU)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    m = CLIP(32, CLIPVisionCfg(layers=2, width=64, patch_size=14, image_size=224),
             CLIPTextCfg(context_length=8, vocab_size=50, width=64, heads=1, layers=1), quick_gelu=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()}, path)


def _source(synth_dir: Path, folder: Path) -> dict[str, str]:
    """Two good images per class (8 in all) and four bad inputs next to them; returns key -> expected reason."""
    classes = sorted(d for d in synth_dir.iterdir() if d.is_dir())
    for d in classes:
        (folder / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:2]:
            shutil.copy(f, folder / d.name / f.name)
    cls = [folder / d.name for d in classes]
    good = next(cls[0].iterdir()).read_bytes()
    (cls[0] / "zero_bytes.JPEG").write_bytes(b"")
    (cls[1] / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (cls[2] / "notes.JPEG").write_text("this is not an image\n")
    (cls[3] / "x_dangling.JPEG").symlink_to(folder / "does-not-exist.JPEG")  # unreadable (root reads 0o000 files)
    return {"zero_bytes": "zero-byte", "truncated": "truncated", "notes": "not an image", "x_dangling": "unreadable"}


def _submit_to_a_new_cluster(tmp_path: Path, extract_args: list[str]) -> None:
    """`ray start --head --block` on free ports, then `ray job submit --working-dir .`; the cluster is torn down."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: unix socket paths are limited to ~107 chars
    gcs, dash, client, agent = free_ports(4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(temp), "PYTHONPATH": str(REPO),
           "RAY_AUTH_MODE": "token"}  # Ray's default for new clusters; the CLI then sends the token
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
                             f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}", "--num-cpus=2",
                             "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:
            assert head.poll() is None, head.stdout.read().decode()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                break
            except OSError:
                assert time.time() < deadline, "Ray dashboard did not come up"
                time.sleep(0.5)
        excludes = json.dumps({"excludes": [".git", ".venv", "demo", "*.egg-info", ".pytest_cache"]})
        cmd = [str(ray_bin), "job", "submit", "--address", url, "--working-dir", ".", "--runtime-env-json", excludes,
               "--", sys.executable, "-m", "pipeline", "extract", *extract_args]
        for _ in range(12):  # the dashboard answers before the head's job agent registers (seen once in CI-like
            # runs on loaded cores): Ray's own advice is to retry; the job had not started, so nothing repeats
            sub = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
            if sub.returncode == 0 or "No available agent to submit job" not in sub.stdout + sub.stderr:
                break
            time.sleep(5)
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-4000:]
        assert "succeeded" in (sub.stdout + sub.stderr).lower()
    finally:
        head.send_signal(signal.SIGTERM)  # stop the head by its PID; --block tears down its children
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        kill_group(head.pid)
        kill_marked(str(temp))  # stragglers of this cluster only (they carry its temp dir)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_512_job_on_a_ray_cluster_then_train_sample_evaluate(synth_dir, tmp_path):
    from manifests.codecs import decode_sample, field_codec  # int8 codes by default: decode them
    from PIL import Image

    from pipeline.encoders import load_encoder, load_vae, vae_moments
    from manifests.preprocess import adm_center_crop
    clip, src = tmp_path / "ViT-L-14.pt", tmp_path / "src"
    feats, exps, samples = tmp_path / "feats512", tmp_path / "exps", tmp_path / "samples512"
    _openai_clip_file(clip)
    bad = _source(synth_dir, src)
    _submit_to_a_new_cluster(tmp_path, ["--source", str(src), "--out", str(feats), "--resolution", "512", "--hflip",
                                        "--vae", "tiny-vae", "--encoders", f"tiny-dinov2,TINY-CLIP={clip}",
                                        "--shard-size", "8", "--batch-size", "8"])
    m = load_manifest(feats, kind="features", verify=True)
    assert m.num_samples == 8 and not [p for p in feats.rglob("*") if p.name.startswith(".tmp-")]
    reasons = {s["key"]: s["reason"] for s in m.skipped}  # the job succeeds; each bad input is listed with why
    assert set(reasons) == set(bad), reasons
    assert all(why in reasons[key] for key, why in bad.items()), reasons
    assert m.preprocess["resolution"] == 512 and m.preprocess["hflip"] is True
    assert m.fields["latent"]["shape"] == [8, 64, 64]
    for name in ("tiny-dinov2", "tiny-clip"):
        f = m.fields[name]
        assert f["shape"] == [1024, 64], (name, f["shape"])
        assert f["encoder"]["grid"] == [32, 32] and f["encoder"]["input_size"] == 448
    enc = m.fields["tiny-clip"]["encoder"]
    assert enc["weights"] == str(clip) and "before ln_post" in enc["tokens"] and enc["mean"][0] == 0.48145466
    for sh in m.shard_paths():
        for s in iter_shard(sh):
            assert s["cls"] == int(s["__key__"].split("_")[0][1:])  # class folder n0000000c -> label c
            for f, spec in m.fields.items():  # a flipped twin of every field: same shape, other values
                assert list(s[f"{f}.flip.npy"].shape) == spec["shape"]
                assert not np.array_equal(s[f"{f}.flip.npy"], s[f"{f}.npy"])
    # Every stored array is the models' own output on the 512 px ADM crop of its source image, and each flipped
    # twin their output on the mirrored crop (up to batch 8 vs batch 1 rounding).
    first = next(iter_shard(m.shard_paths()[0]))
    crop = np.asarray(adm_center_crop(Image.open(src / first["json"]["source"]), 512))
    for flip, img in ((False, crop.copy()), (True, crop[:, ::-1].copy())):
        x = torch.from_numpy(img)[None]  # (1, 512, 512, 3) uint8
        for spec, name in ((f"tiny-clip={clip}", "tiny-clip"), ("tiny-dinov2", "tiny-dinov2")):
            got = decode_sample(first, name, field_codec(name, m.fields[name]), flip=flip)
            np.testing.assert_allclose(got, load_encoder(spec, 512)(x)[0].numpy(), rtol=2e-2, atol=2e-2)
        got = first["latent.flip.npy" if flip else "latent.npy"]
        np.testing.assert_allclose(got, vae_moments(load_vae("tiny-vae"), x)[0].numpy(), rtol=1e-2, atol=5e-3)
    assert np.abs(first["latent.flip.npy"] - first["latent.npy"]).max() > 0.05  # the twin is not the original

    # Train with REPA's train.py names: --data-dir, --output-dir/--exp-name, --enc-type a,b, ...
    assert run_cli(trainer_main, ["train", "--data-dir", str(feats), "--output-dir", str(exps), "--exp-name", "xl512",
                                  "--model", "SiT-Debug/2", "--enc-type", "tiny-dinov2,tiny-clip", "--encoder-depth",
                                  "2", "--max-train-steps", "2", "--checkpointing-steps", "2", "--batch-size", "4",
                                  "--mixed-precision", "no", "--num-workers", "0"]) == 0
    run_dir = exps / "xl512"
    conf = json.loads((run_dir / "config.json").read_text())
    assert conf["resolution"] == 512 and conf["model_kwargs"]["input_size"] == 64
    assert conf["encoders"] == ["tiny-dinov2", "tiny-clip"] and conf["model_kwargs"]["z_dims"] == [64, 64]
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]
    assert stats and all(np.isfinite(s["loss"]) for s in stats if "loss" in s)

    # Sample with generate.py names and the Table 11 preset (its 512 px check passes on this checkpoint).
    assert run_cli(trainer_main, ["sample", "--ckpt", str(run_dir), "--sample-dir", str(samples), "--preset",
                                  "paper-512-cfg", "--num-fid-samples", "4", "--num-steps", "2",
                                  "--per-proc-batch-size", "2", "--no-tf32", "--vae", "tiny-vae", "--npz"]) == 0
    with np.load(samples / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 512, 512, 3)
    sm = load_manifest(samples, kind="samples")
    assert sm.preprocess["resolution"] == 512

    report = tmp_path / "report.json"
    assert run_cli(evaluation_main, ["--samples", str(samples), "--reference", str(synth_dir),
                                     "--inception-weights", "random:0", "--batch-size", "4", "--out", str(report)]) == 0
    r = json.loads(report.read_text())
    assert np.isfinite(r["metrics"]["fid"]), r["metrics"]
    assert "@512" in json.dumps(r)  # the reference folder was ADM-cropped at the samples' 512 px
