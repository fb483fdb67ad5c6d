"""A demo-style features set built in-process (no Ray): synth images -> ADM crop -> pixel-vae moments.

The learning test uses it at 64 px (an 8x8 latent grid) to stay cheap; the shapes, colours and layouts are
those of `pipeline synth`, and the latents those `pipeline extract --vae pixel-vae` writes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from manifests import Manifest, ShardEntry, write_manifest, write_shard
from pipeline.encoders import load_vae, vae_meta, vae_moments
from pipeline.synth import _draw
from manifests.preprocess import adm_center_crop


def synth_crops(classes: int, per_class: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, R, R, 3) uint8 crops and (N,) labels, class by class."""
    crops, labels = [], []
    for c in range(classes):
        for j in range(per_class):
            rng = np.random.default_rng([seed, c, j])
            w, h = (int(v) for v in rng.integers(resolution + resolution // 4, 2 * resolution, size=2))
            img = adm_center_crop(_draw(c, classes, w, h, rng), resolution)
            crops.append(np.asarray(img.convert("RGB")))
            labels.append(c)
    return np.stack(crops), np.array(labels)


def write_pixel_features(root: str | Path, classes: int = 4, per_class: int = 16, resolution: int = 64,
                         shard_size: int = 32) -> tuple[Manifest, np.ndarray, np.ndarray]:
    """A features manifest (latent only: plain SiT) plus the crops and labels it was made from."""
    root = Path(root)
    crops, labels = synth_crops(classes, per_class, resolution)
    vae = load_vae("pixel-vae")
    moments = vae_moments(vae, torch.from_numpy(crops)).numpy()  # (N, 8, R/8, R/8)
    samples = [{"__key__": f"img{i:05d}", "cls": int(labels[i]), "latent.npy": moments[i],
                "json": {"source": f"synth/{i}.jpg", "size": [resolution, resolution]}} for i in range(len(crops))]
    entries = []
    for j in range(0, len(samples), shard_size):
        info = write_shard(root / "shards" / f"train-{j // shard_size:06d}.tar", samples[j:j + shard_size])
        entries.append(ShardEntry(url=f"shards/{info.path.name}", nsamples=len(info.keys), sha256=info.sha256,
                                  bytes=info.bytes))
    fields = {"latent": {"dtype": "float32", "shape": list(moments.shape[1:]), "codec": "vae-moments",
                         "vae": vae_meta("pixel-vae")}}
    m = Manifest(root=root, name="pixel-demo", shardlist=entries, kind="features", num_samples=len(samples),
                 fields=fields, classes=[f"class{c:03d}" for c in range(classes)],
                 preprocess={"resolution": resolution, "crop": "adm-center", "hflip": False},
                 created_by={"version": "test", "command": "tests/demo_data.py"})
    write_manifest(m)
    return m, crops, labels
