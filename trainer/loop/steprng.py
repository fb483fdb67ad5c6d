"""Per-sample training randomness: t, noise, label drop and the posterior draw from (seed, step, global index);
the loader's flips and caption choices from (seed, global position).

Every rank draws the whole global batch's randomness from one generator seeded by (seed, step) and keeps its own
rows, so the number of ranks and the micro-batch size change nothing but float rounding (DESIGN §4), a resume
needs no RNG state, and the draws happen outside any compiled region (compiled and eager runs see the same
streams). The cost is two latent-sized tensors per global batch, a few MB per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STEP_STREAM = 0x57E9  # tags the (seed, step) stream apart from the loader's flip hash and the sampler's seeds
FLIP_TAG = 0xF11B  # the loader's hflip hash stream (flip_bits)
CAPTION_TAG = 0xCA97  # the loader's caption-choice hash stream (caption_choice), apart from the flips'


@dataclass
class StepNoise:
    """The random draws of one global batch (B rows), or of a slice of its rows."""
    t: torch.Tensor  # (B,) time, U(0, 1)
    eps: torch.Tensor  # (B, C, H, W) interpolant noise
    post: torch.Tensor  # (B, C, H, W) posterior draw: z = (mean + std*post)*scale + shift
    drop: torch.Tensor  # (B,) bool: label replaced by the null class

    def rows(self, start: int, n: int) -> "StepNoise":
        """Global-batch rows [start, start+n): one rank's micro-batch."""
        s = slice(start, start + n)
        return StepNoise(self.t[s], self.eps[s], self.post[s], self.drop[s])


def step_seed(seed: int, step: int) -> int:
    """A 64-bit seed from (seed, step) through SeedSequence, so nearby steps are uncorrelated."""
    a, b = np.random.SeedSequence([seed, step, STEP_STREAM]).generate_state(2, np.uint32)
    return (int(a) << 32) | int(b)


class StepRandom:
    """One generator on the training device, re-seeded per step (no host sync, no global RNG state)."""

    def __init__(self, seed: int, batch: int, shape: tuple[int, ...], drop_prob: float, device: torch.device):
        self.seed, self.batch, self.shape, self.drop_prob = seed, batch, tuple(shape), drop_prob
        self.gen = torch.Generator(device=device)
        self.device = device

    def draw(self, step: int) -> StepNoise:
        g = self.gen
        g.manual_seed(step_seed(self.seed, step))
        kw = dict(generator=g, device=self.device)
        t = torch.rand(self.batch, **kw)  # (B,)
        eps = torch.randn((self.batch, *self.shape), **kw)  # (B, C, H, W)
        post = torch.randn((self.batch, *self.shape), **kw)  # (B, C, H, W)
        drop = torch.rand(self.batch, **kw) < self.drop_prob  # (B,)
        return StepNoise(t, eps, post, drop)


def posterior(moments: torch.Tensor, post: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """VAE moments (N, 2C, H, W), mean then std, and a draw (N, C, H, W) -> the scaled latent (N, C, H, W)."""
    mean, std = moments.chunk(2, dim=1)  # (N, C, H, W) each
    z = (mean + std * post) * scale
    return z + shift if shift else z


def position_hash(seed: int, tag: int, positions: np.ndarray) -> np.ndarray:
    """A SplitMix64 hash (uint64) of each global sample position, in the stream (seed, tag)."""
    with np.errstate(over="ignore"):
        x = positions.astype(np.uint64) + np.uint64(step_seed(seed, tag) & 0xFFFFFFFFFFFFFFFF)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def flip_bits(seed: int, positions: np.ndarray) -> np.ndarray:
    """Whether each global sample position uses its flipped twin: a SplitMix64 hash of (seed, position).

    A hash of the global position (step * batch + index) rather than a generator per micro-batch, so the choice
    does not depend on how the global batch is cut into ranks and micro-batches.
    """
    return (position_hash(seed, FLIP_TAG, positions) >> np.uint64(63)).astype(bool)


def caption_choice(seed: int, positions: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Which of its K captions each global sample position trains on: hash(seed, position) mod K, int64.

    Like the flips, a function of the global position (step * batch + index in the global batch) only, so any
    rank count, micro-batch, worker count or resume picks the same caption; uniform over the K captions up to
    K / 2**64 (REPA dataset.py: `random.randint(0, n_captions - 1)` per draw).
    """
    counts = np.asarray(counts, np.uint64)
    if (counts == 0).any():
        raise ValueError("caption_choice: a sample with no captions")
    return (position_hash(seed, CAPTION_TAG, positions) % counts).astype(np.int64)


__all__ = ["StepNoise", "StepRandom", "step_seed", "posterior", "flip_bits", "position_hash", "caption_choice"]
