"""Test helpers: small hand-built shard sets that follow the manifest contract (no pipeline needed)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from manifests import SD_VAE_SCALE, Manifest, ShardEntry, storage, write_manifest, write_shard

REPO = Path(__file__).resolve().parents[1]


def make_features_manifest(root: str | os.PathLike, *, num: int = 32, classes: int = 4, shard_size: int = 16,
                           encoders: dict[str, int] | None = None, latent_shape=(8, 32, 32), tokens: int = 256,
                           hflip: bool = False, seed: int = 0) -> Manifest:
    """Write a features shard set of random arrays with the contract's layout and return its manifest."""
    encoders = {"tiny-dinov2": 64} if encoders is None else encoders
    root = storage.path(root)  # a folder or an object-store URL
    rng = np.random.default_rng(seed)
    entries, keys = [], []
    samples = []
    for i in range(num):
        c, h, w = latent_shape
        mean = rng.standard_normal((c // 2, h, w)).astype(np.float32)
        std = np.full((c // 2, h, w), 0.1, np.float32)
        s = {"__key__": f"img{i:05d}", "cls": i % classes, "latent.npy": np.concatenate([mean, std]),
             "json": {"source": f"synthetic/{i}.jpg", "size": [h * 8, w * 8]}}
        for name, d in encoders.items():
            s[f"{name}.npy"] = rng.standard_normal((tokens, d)).astype(np.float16)
            if hflip:
                s[f"{name}.flip.npy"] = rng.standard_normal((tokens, d)).astype(np.float16)
        if hflip:
            s["latent.flip.npy"] = np.concatenate([mean[..., ::-1], std])
        samples.append(s)
        keys.append(s["__key__"])
    for j in range(0, num, shard_size):
        info = write_shard(root / "shards" / f"train-{j // shard_size:06d}.tar", samples[j:j + shard_size])
        entries.append(ShardEntry(url=f"shards/{info.path.name}", nsamples=len(info.keys), sha256=info.sha256,
                                  bytes=info.bytes))
    fields = {"latent": {"dtype": "float32", "shape": list(latent_shape), "codec": "vae-moments",
                         "vae": {"name": "tiny-vae", "scaling_factor": SD_VAE_SCALE, "shift": 0.0}}}
    for name, d in encoders.items():
        fields[name] = {"dtype": "float16", "shape": [tokens, d], "codec": "patch-tokens",
                        "encoder": {"name": name, "pretrained": False, "grid": [16, 16]}}
    m = Manifest(root=root, name="test-features", shardlist=entries, kind="features", num_samples=num,
                 fields=fields, classes=[f"class{c:03d}" for c in range(classes)],
                 preprocess={"resolution": latent_shape[1] * 8, "crop": "adm-center", "hflip": hflip},
                 created_by={"version": "test", "command": "tests/helpers.py"})
    write_manifest(m)
    return m


def run_module(*args: str, cwd: str | os.PathLike | None = None, env: dict | None = None, timeout: float = 600,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m <args>` with this interpreter, capturing output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd or REPO, env=full_env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def assert_user_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr, no traceback, and it names the culprit."""
    err = p.stderr.strip()
    assert p.returncode == 2, f"exit {p.returncode}, stderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, err
    for n in needles:
        assert n in lines[-1], f"{n!r} not in {lines[-1]!r}"
