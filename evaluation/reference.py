"""Reference batches (.npz): ADM's keys, the keys we add, and when stored statistics may stand in for a pass.

ADM's keys: `arr_0` (uint8 images, for precision/recall), `mu`, `sigma` (pool3), `mu_s`, `sigma_s` (sFID).
We add `inception_weights` (which weights made them), `pool3` (per-image pool3 features, so P/R needs no pass
over `arr_0`) and, with FD_DINOv2, `mu_dinov2`, `sigma_dinov2` and `dinov2_weights` (network, weights and
resize mode). Stored statistics are used only when they were made by the weights in use; a reference whose
every needed array is stored and applies is evaluated without reading its images.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import UserError
from manifests import atomic_open

STAT_SHAPES = {"mu": "d", "sigma": "dd", "mu_s": "s", "sigma_s": "ss"}
WEIGHTS_TAG = "inception_weights"  # extra array in references we write: which weights made the statistics
POOL_KEY = "pool3"  # (N, 2048) float32 per-image pool3 features of arr_0
DINO_KEYS = ("mu_dinov2", "sigma_dinov2")
DINO_TAG = "dinov2_weights"  # DinoV2Features.cache_id of the network that made them


@dataclass
class StoredReference:
    """What a reference .npz stores besides its images (validated), and the tags saying what made it."""
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # mu, sigma, mu_s, sigma_s (float64)
    tag: str | None = None
    pool: np.ndarray | None = None  # (N, 2048) float32
    dino: dict[str, np.ndarray] = field(default_factory=dict)  # mu, sigma (float64)
    dino_tag: str | None = None


def _finite(path: Path, k: str, v: np.ndarray, want: tuple[int, ...]) -> None:
    if v.shape != want or not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
        raise UserError(f"reference {path}: '{k}' has shape {list(v.shape)} dtype {v.dtype}, expected finite "
                        f"floats of shape {list(want)}")


def load_stored(path: Path, count: int) -> StoredReference:
    """A reference .npz's stored arrays, validated before any work (`count`: the images in its arr_0)."""
    from evaluation.images import load_npz_arrays
    from evaluation.inception import POOL_DIM, SPATIAL_DIM
    arrays = load_npz_arrays(path, [*STAT_SHAPES, WEIGHTS_TAG, POOL_KEY, *DINO_KEYS, DINO_TAG])
    stats = {k: v for k, v in arrays.items() if k in STAT_SHAPES}
    for a, b in (("mu", "sigma"), ("mu_s", "sigma_s"), DINO_KEYS):
        if (a in arrays) != (b in arrays):
            have, lack = (a, b) if a in arrays else (b, a)
            raise UserError(f"reference {path} has '{have}' without '{lack}'; both or neither are required")
    dims = {"d": POOL_DIM, "s": SPATIAL_DIM}
    for k, v in stats.items():
        _finite(path, k, v, tuple(dims[c] for c in STAT_SHAPES[k]))
    out = StoredReference({k: v.astype(np.float64) for k, v in stats.items()},
                          str(arrays[WEIGHTS_TAG]) if WEIGHTS_TAG in arrays else None)
    if POOL_KEY in arrays:
        _finite(path, POOL_KEY, arrays[POOL_KEY], (count, POOL_DIM))
        out.pool = arrays[POOL_KEY].astype(np.float32)
    if DINO_KEYS[0] in arrays:
        mu, sigma = arrays[DINO_KEYS[0]], arrays[DINO_KEYS[1]]
        d = mu.shape[0] if mu.ndim == 1 else -1
        _finite(path, DINO_KEYS[0], mu, (d,))
        _finite(path, DINO_KEYS[1], sigma, (d, d))
        out.dino = {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}
        out.dino_tag = str(arrays[DINO_TAG]) if DINO_TAG in arrays else None
    return out


def inception_applies(stored: StoredReference, model, recompute: bool) -> tuple[bool, str]:
    """Whether the stored Inception statistics apply to these weights, with the reason either way."""
    if not stored.stats:
        return False, "computed (the .npz stores no statistics)"
    if recompute:
        return False, "computed (--recompute-reference-stats)"
    if stored.tag is None and not model.comparable:
        return False, "computed (stored statistics come from the TF Inception, not these random weights)"
    if stored.tag is not None and stored.tag != model.cache_id:
        return False, f"computed (stored statistics were made with other weights: {stored.tag[:16]})"
    return True, "npz"


def dino_applies(stored: StoredReference, dinov2, recompute: bool) -> tuple[bool, str]:
    """Whether the stored DINOv2 statistics were made by this network, weights and resize mode."""
    if not stored.dino:
        return False, "computed (the .npz stores no DINOv2 statistics)"
    if recompute:
        return False, "computed (--recompute-reference-stats)"
    if stored.dino_tag != dinov2.cache_id:
        return False, f"computed (stored DINOv2 statistics were made by {stored.dino_tag})"
    return True, "npz"


def write_reference(path: Path, images: np.ndarray, acts, model, dinov2) -> None:
    """An ADM-format reference batch plus what we add: arr_0, the statistics of each network that ran, pool3,
    and the tags of the weights that made them."""
    arrays: dict[str, np.ndarray] = {"arr_0": images}
    if acts.mu is not None:
        arrays.update(mu=acts.mu, sigma=acts.sigma, mu_s=acts.mu_s, sigma_s=acts.sigma_s, pool3=acts.pool,
                      **{WEIGHTS_TAG: np.array(model.cache_id)})
    if acts.dinov2 is not None:
        arrays.update(mu_dinov2=acts.dinov2.mu, sigma_dinov2=acts.dinov2.sigma,
                      **{DINO_TAG: np.array(dinov2.cache_id)})
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    print(f"wrote reference batch {path} ({images.shape[0]} images)", file=sys.stderr)
