"""Non-finite bookkeeping of the training step, kept on the device and read back without stalling the GPU.

Each step packs its gradient norm, loss scale and per-field "input had NaN/inf" flags (and, with several ranks,
the all-reduced stop flag) into one small tensor, copies it to pinned host memory without blocking, and records
an event. The loop reads a step's record once the next step has been queued (the GPU keeps working meanwhile),
or at once when a report or checkpoint needs it. So the step itself holds no device-to-host sync, yet every
skipped step is logged, a corrupt sample is named, and a streak of non-finite steps stops the run, each with
the step it happened at.
"""
from __future__ import annotations

import math
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from common import UserError


@dataclass
class _Record:
    step: int
    host: torch.Tensor  # [grad norm, scale before, scale after, stop, any-bad per (micro, field)...]
    event: torch.cuda.Event | None
    inputs: list  # per micro-batch: (keys, [(field, rows (n,) bool on the device)])


class Health:
    """Counts skipped steps and the current non-finite streak; raises UserError on corrupt data or a long streak."""

    def __init__(self, device: torch.device, rank: int, max_nonfinite: int, fp16: bool, skipped: int = 0,
                 warn: Callable[[str], None] | None = None):
        self.device, self.rank, self.max_nonfinite, self.fp16 = device, rank, max_nonfinite, fp16
        self.warn = warn or (lambda text: tqdm.write(text, file=sys.stderr))  # the run's log.txt when given
        self.pending: deque[_Record] = deque()
        self.skipped, self.skipped_since, self.streak = skipped, 0, 0
        self.grad_norm, self.stop = float("nan"), False
        self.last_ckpt = "none"

    def record(self, step: int, gn: torch.Tensor, scale_before: torch.Tensor, scale_after: torch.Tensor,
               stop: torch.Tensor, inputs: list) -> None:
        """Queue step `step`'s flags for reading (no sync)."""
        bad = [rows.any() for _, fields in inputs for _, rows in fields]
        vals = torch.stack([gn.detach().float().reshape(()), scale_before.float().reshape(()),
                            scale_after.float().reshape(()), stop.float().reshape(())]
                           + [b.float() for b in bad])  # (4 + micro*fields,)
        cuda = vals.is_cuda
        host = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=cuda)
        host.copy_(vals, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append(_Record(step, host, event, inputs))

    def settle(self, keep: int = 0) -> None:
        """Read every pending record but the newest `keep`, oldest first."""
        while len(self.pending) > keep:
            rec = self.pending.popleft()
            if rec.event is not None:
                rec.event.synchronize()  # an older step: the GPU is busy with the newer one meanwhile
            gn, s0, s1, stop, *bad = rec.host.tolist()
            self.stop = self.stop or stop > 0
            if math.isfinite(gn):
                self.streak, self.grad_norm = 0, gn
                continue
            if any(b > 0 for b in bad):
                self._name_bad_sample(rec)
            self.streak += 1
            self.skipped_since += 1
            self.skipped += 1
            if self.rank == 0:
                what = f"fp16 overflow, loss scale {s0:g} -> {s1:g}" if self.fp16 else "non-finite gradients"
                self.warn(f"step {rec.step}: {what}; update skipped ({self.skipped} skipped so far)")
            if self.streak >= self.max_nonfinite:
                raise UserError(f"step {rec.step}: loss/gradients non-finite for {self.streak} consecutive steps "
                                f"(since step {rec.step - self.streak + 1}); stopping. Last good checkpoint: "
                                f"{self.last_ckpt}")

    def _name_bad_sample(self, rec: _Record) -> None:
        """Corrupt data (a NaN latent, say) stops the run, naming the sample."""
        for keys, fields in rec.inputs:
            for field, rows in fields:
                if bool(rows.any()):
                    key = keys[int(rows.nonzero()[0, 0])]
                    raise UserError(f"step {rec.step}: sample '{key}' has non-finite values in field '{field}' "
                                    f"(corrupt shard?); last good checkpoint: {self.last_ckpt}")

    def take_interval(self) -> int:
        """Skipped steps since the last report (and reset the count)."""
        n, self.skipped_since = self.skipped_since, 0
        return n


__all__ = ["Health"]
