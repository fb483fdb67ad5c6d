"""Linear probe on frozen features (REPA Appendix C.1, after DAE, Chen et al. 2024c).

A parameter-free BatchNorm (affine=False) then one Linear layer, trained with cross-entropy and Adam whose
learning rate decays from 1e-3 to 0 along a cosine over all steps. The paper uses 90 epochs at batch 16384.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROBE_LR = 1e-3  # REPA C.1: "the initial learning rate is set to 0.001"
PROBE_EPOCHS = 90  # REPA C.1
PROBE_BATCH = 16384  # REPA C.1
HELDOUT_PERCENT = 20  # our choice: the paper trains on ImageNet train and tests on val; we split one set


@dataclass(kw_only=True)
class ProbeConfig:
    """How to train the probe."""
    epochs: int = PROBE_EPOCHS
    batch_size: int = PROBE_BATCH
    lr: float = PROBE_LR
    seed: int = 0
    device: str = "cpu"


@dataclass
class ProbeResult:
    """Top-1 accuracy on the held-out and the training split."""
    top1: float
    train_top1: float
    num_train: int
    num_test: int


def heldout_mask(keys: list[str], percent: int = HELDOUT_PERCENT) -> np.ndarray:
    """Deterministic split by key: a sample is held out iff sha256(key) mod 100 < percent.

    It depends on the key only, so a sample stays on the same side whatever subset or order is read.
    """
    return np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") % 100 < percent
                     for k in keys], dtype=bool)


class LinearProbe(nn.Module):
    """BatchNorm1d without affine parameters, then one linear layer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        # momentum=None keeps an exact running average, so eval uses the whole training set's statistics.
        self.norm = nn.BatchNorm1d(dim, affine=False, momentum=None, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE/DAE linear-probe head init
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))  # (N, C)


def _accuracy(model: LinearProbe, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            correct += int((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
    return correct / max(len(x), 1)


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, cfg: ProbeConfig | None = None) -> ProbeResult:
    """Train the probe on (train_x, train_y) and report top-1 on (test_x, test_y)."""
    cfg = cfg or ProbeConfig()
    dev = torch.device(cfg.device)
    xtr = torch.as_tensor(np.asarray(train_x), dtype=torch.float32).to(dev)  # (N, D)
    ytr = torch.as_tensor(np.asarray(train_y), dtype=torch.int64).to(dev)
    xte = torch.as_tensor(np.asarray(test_x), dtype=torch.float32).to(dev)
    yte = torch.as_tensor(np.asarray(test_y), dtype=torch.int64).to(dev)
    if xtr.ndim != 2 or len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError(f"probe inputs mismatch: train {tuple(xtr.shape)}/{len(ytr)}, "
                         f"test {tuple(xte.shape)}/{len(yte)}")
    if len(xtr) < 2:
        raise ValueError(f"the probe needs at least 2 training samples, got {len(xtr)}")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = LinearProbe(xtr.shape[1], num_classes).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batch = min(cfg.batch_size, len(xtr))
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total = max(cfg.epochs * steps_per_epoch, 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen).to(dev)
        for s in range(0, len(xtr), batch):
            sel = perm[s:s + batch]
            if len(sel) < 2:  # BatchNorm cannot normalise a batch of one
                continue
            loss = F.cross_entropy(model(xtr[sel]), ytr[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    eval_batch = max(batch, 4096)
    return ProbeResult(top1=_accuracy(model, xte, yte, eval_batch), train_top1=_accuracy(model, xtr, ytr, eval_batch),
                       num_train=len(xtr), num_test=len(xte))
