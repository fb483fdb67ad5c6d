"""Read the images an alignment analysis needs from a features manifest: latent moments, labels, encoder tokens."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from manifests import storage
from manifests import SD_VAE_SCALE, SD_VAE_SHIFT, Manifest, decode_member, index_shard, read_member
from common import UserError, check
from manifests.codecs import decode_arrays, field_codec, scale_field


@dataclass
class AlignData:
    """The selected images, in manifest order."""
    keys: list[str]
    labels: np.ndarray  # (N,) int64
    moments: np.ndarray  # (N, 2C, H, W) float32: VAE mean then std
    enc_pooled: np.ndarray  # (N, D) float32: encoder patch tokens averaged over tokens
    enc_tokens: np.ndarray  # (P, T, D) float32: full tokens of the first P images (for the PCA figure)
    encoder: str
    scale: float
    shift: float


def pick_encoder(m: Manifest, name: str | None) -> str:
    """The requested patch-token field, or the manifest's first one."""
    fields = m.encoder_fields()
    check(bool(fields), f"manifest {m.path} has no encoder (patch-tokens) field to compare against")
    if name is None:
        return fields[0]
    check(name in fields, f"--encoder {name!r} is not a patch-tokens field of {m.path}; it has: {', '.join(fields)}")
    return name


def select_indices(total: int, num: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of `num` sample positions (all when num is None or >= total), sorted."""
    if num is None or num >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=num, replace=False))


def latent_scale_shift(m: Manifest) -> tuple[float, float]:
    """The VAE scaling recorded in the manifest (DESIGN §2), else the SD-VAE constants."""
    vae = m.fields["latent"].get("vae", {}) or {}
    return float(vae.get("scaling_factor", SD_VAE_SCALE)), float(vae.get("shift", SD_VAE_SHIFT))


def read_align_data(m: Manifest, encoder: str, num_images: int | None, seed: int, pca_images: int = 0) -> AlignData:
    """Read `latent`, `cls` and `<encoder>` of a seeded subset through the tar member index (only those bytes)."""
    check(m.kind == "features", f"{m.path} is a '{m.kind}' manifest; alignment needs a features manifest")
    lat = m.field("latent", hint="alignment needs the VAE moments")
    check(len(lat["shape"]) == 3 and lat["shape"][0] % 2 == 0,
          f"manifest field 'latent' has shape {lat['shape']}, expected [2C, H, W] VAE moments")
    enc = m.field(encoder)
    check(len(enc["shape"]) == 2, f"manifest field '{encoder}' has shape {enc['shape']}, expected [T, D] tokens")
    check(m.num_samples > 0, f"manifest {m.path} holds no samples")
    chosen = set(select_indices(m.num_samples, num_images, seed).tolist())
    keys, labels, moments, pooled, tokens = [], [], [], [], []
    pos = 0
    bar = tqdm(total=len(chosen), desc="read features", unit="img")
    for entry in m.shardlist:
        path = m.root / entry.url
        index = index_shard(path)
        check(len(index) == entry.nsamples,
              f"shard '{entry.url}' holds {len(index)} samples, manifest says {entry.nsamples}")
        with storage.open_read(path) as f:  # a local file or an object (read ahead in large blocks)
            for key, members in index.items():
                if pos in chosen:
                    sample = _read_sample(f, key, members, encoder, entry.url, field_codec(encoder, enc))
                    _check_shapes(sample, lat["shape"], enc["shape"], encoder, key)
                    keys.append(key)
                    labels.append(sample["cls"])
                    moments.append(sample["latent"])
                    tok = sample[encoder]
                    pooled.append(tok.mean(axis=0, dtype=np.float64).astype(np.float32))  # (D,)
                    if len(tokens) < pca_images:
                        tokens.append(tok.astype(np.float32))
                    bar.update(1)
                pos += 1
    bar.close()
    scale, shift = latent_scale_shift(m)
    d = enc["shape"]
    return AlignData(keys=keys, labels=np.asarray(labels, np.int64), moments=np.stack(moments).astype(np.float32),
                     enc_pooled=np.stack(pooled), encoder=encoder, scale=scale, shift=shift,
                     enc_tokens=np.stack(tokens) if tokens else np.zeros((0, d[0], d[1]), np.float32))


def _read_sample(f, key: str, members: dict, encoder: str, url: str, codec) -> dict:
    out = {}
    wanted = [("cls", "cls"), ("latent", "latent.npy"), (encoder, f"{encoder}.npy")]
    if codec.scaled:  # 8-bit token codes come with one scale per token (manifests/codecs.py)
        wanted.append(("scale", f"{scale_field(encoder)}.npy"))
    for field, ext in wanted:
        check(ext in members, f"sample '{key}' in shard '{url}' has no '{ext}' member")
        off, size = members[ext]
        out[field] = decode_member(ext, read_member(f, off, size, f"{url}:{key}.{ext}"), f"{url}:{key}.{ext}")
    out[encoder] = decode_arrays(out[encoder], out.pop("scale", None), codec, f"shard '{url}': sample '{key}'")
    return out


def _check_shapes(sample: dict, lat_shape, enc_shape, encoder: str, key: str) -> None:
    for field, want in (("latent", lat_shape), (encoder, enc_shape)):
        arr = sample[field]
        check(list(arr.shape) == list(want),
              f"sample '{key}' field '{field}' has shape {list(arr.shape)}, manifest says {list(want)}")
        if not np.isfinite(arr).all():
            raise UserError(f"sample '{key}' field '{field}' holds NaN or Inf values")

