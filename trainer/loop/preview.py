"""Sample grids during training: the EMA model, fixed classes (or, for text families, fixed prompts) and fixed
noise, a few steps of the family's default sampler (SiT: the SDE, DiT: DDPM, MMDiT: the ODE), the run's VAE.

A text family's prompts are the first N distinct first captions of the manifest's samples, with the contexts the
manifest stores for them (decoded as training decodes them), so grids need no text encoder; they are listed in
RUN/samples/prompts.txt, one per grid cell in reading order.

The same labels and the same noise (initial and per-step, from sample i's own generator as in
`trainer sample`) at every grid, so a viewer watches the same images sharpen over training.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from manifests import atomic_open

from trainer.models import ModelRecord
from trainer.sampling.output import decode
from trainer.sampling.samplers import sample_generator

PREVIEW_SEED = 0x5EED  # the grid's own noise stream, apart from any `trainer sample --seed`
PAD = 2  # pixels between grid cells


def grid_labels(n: int, num_classes: int) -> list[int]:
    """n fixed labels: every class in turn when n >= classes, else n classes spread over the range."""
    if n >= num_classes:
        return [i % num_classes for i in range(n)]
    return [i * num_classes // n for i in range(n)]


def grid_columns(n: int, num_classes: int) -> int:
    """One column per class when every class shows (rows are then noise seeds), else about square."""
    if num_classes <= n and n % num_classes == 0 and num_classes <= 16:
        return num_classes
    return math.ceil(math.sqrt(n))


def tile(images: np.ndarray, cols: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+PAD)-PAD, cols*(W+PAD)-PAD, 3) image on white."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + PAD) - PAD, cols * (w + PAD) - PAD, 3), 255, np.uint8)
    for j, im in enumerate(images):
        r, c = divmod(j, cols)
        out[r * (h + PAD):r * (h + PAD) + h, c * (w + PAD):c * (w + PAD) + w] = im
    return out


def grid_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "samples" / f"step-{step:07d}.png"


class Preview:
    """Draws RUN/samples/step-NNNNNNN.png from the EMA model (rank 0)."""

    def __init__(self, run_cfg: dict[str, Any], n: int, steps: int, device: torch.device):
        self.record = rec = ModelRecord.from_config(run_cfg)  # read as sampling reads a checkpoint's config
        kw = rec.model_kwargs
        self.steps, self.device = steps, device
        self.path, self.vae_name = rec.path, rec.vae
        self.scale, self.shift = rec.latent_scale, rec.latent_shift
        self.sampler = rec.family.samplers[rec.family.default_sampler]
        self.text = rec.family.conditioning == "text"
        if self.text:  # fixed prompts: the manifest's own contexts of its first samples' first captions
            self.prompts, ctx = grid_contexts(run_cfg["manifest"], (run_cfg.get("context") or {}).get("field",
                                                                                                        "context"), n)
            self.labels, self.null = torch.from_numpy(ctx), None  # (n, L, D); no CFG in grids
            self.cols = math.ceil(math.sqrt(len(self.prompts)))
        else:
            self.num_classes = int(kw["num_classes"])
            self.labels = torch.tensor(grid_labels(n, self.num_classes), dtype=torch.long)  # (n,)
            self.null, self.prompts = self.num_classes, None
            self.cols = grid_columns(n, self.num_classes)
        self.shape = (int(kw["in_channels"]), int(kw["input_size"]), int(kw["input_size"]))
        self.vae = None

    def load_vae(self) -> None:
        """Load the run's VAE once (pipeline's loader: the same one `trainer sample` decodes with)."""
        from pipeline.encoders import load_vae
        self.vae = load_vae(self.vae_name, device=self.device)

    @torch.no_grad()
    def images(self, ema: torch.nn.Module) -> np.ndarray:
        """(n, H, W, 3) uint8 samples of the EMA model; identical noise on every call."""
        if self.vae is None:
            self.load_vae()
        gens = [sample_generator(PREVIEW_SEED, i) for i in range(len(self.labels))]
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in gens])  # (n, C, h, w)

        def fn(x, t, y):
            return ema(x, t, context=y) if self.text else ema(x, t, y=y)

        z = self.sampler(fn, noise.to(self.device), self.labels.to(self.device), steps=self.steps, generator=gens,
                         path=self.path, null_class=self.null)  # (n, C, h, w) float64
        return decode(self.vae, z, self.scale, self.shift)  # (n, H, W, 3)

    def grid(self, ema: torch.nn.Module) -> np.ndarray:
        return tile(self.images(ema), self.cols)


def grid_contexts(manifest: str, field: str, n: int) -> tuple[list[str], np.ndarray]:
    """The first n distinct prompts, each a sample's first caption in manifest order (a class-sorted set would
    otherwise fill the grid with one prompt), and its stored context: (prompts, (n, L, D))."""
    from manifests import iter_shard, load_manifest
    from manifests.codecs import decode_sample, field_codec
    m = load_manifest(manifest, kind="features")
    codec = field_codec(field, m.field(field), f"manifest {m.path}")
    prompts, ctx = [], []
    for url in m.shard_paths():
        for s in iter_shard(url):
            text = str(s["json"]["captions"][0])
            if text in prompts:
                continue
            prompts.append(text)
            ctx.append(decode_sample(s, field, codec, where=f"{url}:{s['__key__']}")[0])  # (L, D)
            if len(prompts) == n:
                return prompts, np.stack(ctx)
    return prompts, np.stack(ctx)


def save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image
    with atomic_open(path, "wb") as f:
        Image.fromarray(img).save(f, format="PNG")


__all__ = ["Preview", "grid_contexts", "grid_labels", "grid_columns", "tile", "grid_path", "save_png", "PREVIEW_SEED"]
