"""The demo shows learning: with the analytic pixel-vae, the sample grids' per-class colours move to the data's.

A demo-size run kept cheap: 4 classes of the synthetic set at 64 px (an 8x8 latent, 16 tokens), plain SiT-Debug/2,
200 steps. The training grids (fixed classes, fixed noise; one column per class) are read back and each class's
mean colour is compared with that class's mean colour in the data.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from demo_data import write_pixel_features
from common import run_cli

from trainer.__main__ import main as trainer_main
from trainer.loop.preview import PAD

CLASSES, RES = 4, 64


def class_means(grid_png, classes: int = CLASSES, res: int = RES) -> np.ndarray:
    """(classes, 3) mean RGB of each column of a training grid (column c holds class c)."""
    g = np.asarray(Image.open(grid_png).convert("RGB")).astype(np.float64)
    cols = (g.shape[1] + PAD) // (res + PAD)
    assert cols == classes
    return np.stack([g[:, c * (res + PAD):c * (res + PAD) + res].reshape(-1, 3).mean(0) for c in range(classes)])


@pytest.mark.slow
def test_grids_class_colours_move_towards_their_class(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, crops, labels = write_pixel_features(tmp_path / "feat", classes=CLASSES, per_class=16, resolution=RES)
        data = np.stack([crops[labels == c].reshape(-1, 3).mean(0) for c in range(CLASSES)])  # (C, 3)
        run = tmp_path / "run"
        argv = ["train", "--manifest", str(tmp_path / "feat"), "--run-dir", str(run), "--model", "SiT-Debug/2",
                "--encoders", "none", "--batch-size", "16", "--steps", "200", "--lr", "1e-3", "--ema-decay", "0.95",
                "--precision", "fp32", "--num-workers", "0", "--log-every", "50", "--ckpt-every", "200",
                "--sample-every", "100", "--sample-grid", str(4 * CLASSES), "--sample-steps", "16",
                "--report-to", "none"]
        assert run_cli(trainer_main, argv) == 0
    finally:
        torch.set_num_threads(before)
    dist = {}
    for step in (0, 100, 200):
        m = class_means(run / "samples" / f"step-{step:07d}.png")
        dist[step] = np.linalg.norm(m[:, None] - data[None], axis=-1)  # (C samples, C data)
    start, end = dist[0].diagonal(), dist[200].diagonal()
    assert (end < start).all() and end.mean() < 0.4 * start.mean(), (start, end)  # towards the class's colours
    # ... and class-conditionally: each class's samples sit nearest to their own class's data, not another's
    assert (dist[200].argmin(axis=1) == np.arange(CLASSES)).sum() >= CLASSES - 1, dist[200].round(1)
