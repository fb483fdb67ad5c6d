"""Sample-job output: VAE decoding to uint8, PNG bytes, the streamed ADM npz and the preview grid."""
from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from common import UserError
from manifests import atomic_open, iter_shard

DECODE_CHUNK = 32  # images per VAE decode call
GRID_SIZE = 64  # grid.png shows the first 64 samples (8x8)


@torch.no_grad()
def decode(vae, z: torch.Tensor, scale: float, shift: float) -> np.ndarray:
    """Latents (N, C, h, w) float64 -> uint8 (N, H, W, 3), truncating as REPA generate.py does."""
    out = []
    for part in z.split(DECODE_CHUNK):  # bounds the decoder's activation memory at any --batch-size
        x = vae.decode(((part.float() - shift) / scale).to(next(vae.parameters()).dtype)).sample.float()
        x = (x + 1) / 2.0
        out.append(torch.clamp(255.0 * x, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8))
    return torch.cat(out).numpy()


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_npz(path: Path, shard_paths: list[Path], num: int, hw: tuple[int, int]) -> None:
    """samples.npz with arr_0 (N, H, W, 3) uint8, streamed one shard at a time (never all images twice)."""
    with atomic_open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as out:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (num, hw[0], hw[1], 3)}
            np.lib.format.write_array_header_2_0(out, header)
            written = 0
            for sp in shard_paths:
                rows = np.stack([s["png"] for s in iter_shard(sp)])  # (n, H, W, 3) one shard only
                out.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
                written += len(rows)
            if written != num:  # raised inside atomic_open, so a short npz never becomes visible
                raise UserError(f"{path}: wrote {written} images, expected {num}")


def write_grid(path: Path, shard_paths: list[Path], n: int = GRID_SIZE) -> None:
    from PIL import Image
    imgs: list[np.ndarray] = []
    for sp in shard_paths:
        for s in iter_shard(sp):
            imgs.append(s["png"])
            if len(imgs) == n:
                break
        if len(imgs) == n:
            break
    cols = math.ceil(math.sqrt(len(imgs)))
    rows = math.ceil(len(imgs) / cols)
    h, w, _ = imgs[0].shape
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for j, im in enumerate(imgs):
        grid[(j // cols) * h:(j // cols + 1) * h, (j % cols) * w:(j % cols + 1) * w] = im
    with atomic_open(path, "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
