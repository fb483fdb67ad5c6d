"""`--micro-batch auto`: the largest micro-batch that divides the per-rank batch and fits the memory budget.

The budget covers everything the training process holds on its device: weights, gradients, AdamW moments, the EMA
copy and the activations of one micro-batch. A probe runs one real forward and backward (eager, the trainer's own
loss and autocast) and measures the activations: on CUDA as the allocator's peak, on CPU as the bytes of the
tensors autograd saves (torch.autograd.graph.saved_tensors_hooks). It halves on OOM or when over budget, then frees
its memory. The global batch and the optimiser step do not change: only the accumulation split does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

from common import UserError, check

BUDGET_ENV = "REPA_MEMORY_BUDGET_GB"
# The probe may fill this share of the budget: the rest is for allocator fragmentation, cuBLAS/cuDNN/NCCL
# workspaces and the CUDA context, which the allocator does not see.
HEADROOM = 0.9


@dataclass
class Probe:
    micro: int
    need: int  # bytes: training state + activations of one micro-batch
    budget: int
    budget_from: str
    state: int

    def describe(self, local: int) -> str:
        gb = 2.0 ** 30
        return (f"micro-batch auto: {self.micro} of the per-rank batch {local} (needs {self.need / gb:.2f} GB: "
                f"state {self.state / gb:.2f} + activations {(self.need - self.state) / gb:.2f}; budget "
                f"{self.budget / gb:.2f} GB from {self.budget_from}, {HEADROOM:.0%} usable)")


def budget(device: torch.device) -> tuple[int, str]:
    """(bytes, where from): the device's memory, capped by $REPA_MEMORY_BUDGET_GB."""
    caps = []
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            gb = float(env)
        except ValueError:
            gb = -1.0
        check(gb > 0, f"${BUDGET_ENV} must be a positive number of GB, got {env!r}")
        caps.append((int(gb * 2 ** 30), f"${BUDGET_ENV}={env}"))
    if device.type == "cuda":
        caps.append((torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)))
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 1 << 62
        caps.append((int(free), "free RAM"))
    return min(caps)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Weights + gradients + AdamW moments (exp_avg, exp_avg_sq) + the EMA copy."""
    weights = _bytes(model.parameters()) + _bytes(model.buffers())
    trainable = _bytes(p for p in model.parameters() if p.requires_grad)
    adam = 2 * trainable
    if opt.state:  # resumed: the moments exist already, count them as they are
        adam = _bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return weights + trainable + adam + _bytes(ema.parameters()) + _bytes(ema.buffers())


def _activation_bytes(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Run one forward+backward; return the bytes it needed beyond the weights (activations, inputs, grads' peers)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss_fn().backward()
        torch.cuda.synchronize(device)
        grads = _bytes(p for p in model.parameters() if p.requires_grad)  # counted in the state already
        return max(torch.cuda.max_memory_allocated(device) - base - grads, 0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in weights:  # a weight saved for backward is no new memory
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(saved.values())


def probe_micro(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, local: int,
                make_batch: Callable[[int], dict], loss: Callable[..., Any], loss_kw: dict,
                amp: Callable[[], ContextManager], device: torch.device, extra: int = 0) -> Probe:
    """The largest divisor of `local` whose real forward+backward fits; halves (to a divisor) on OOM.

    `loss` is the family's objective loss (`Family.objective.loss`), called as the training loop calls it.
    """
    total, where = budget(device)
    state = state_bytes(model, ema, opt) + extra
    micro = local
    while True:
        batch = make_batch(micro)
        try:
            act = _activation_bytes(model, lambda: loss(model, **batch, amp=amp, **loss_kw).total, device)
            need = state + act + _bytes(v for v in batch.values() if torch.is_tensor(v)) + _bytes(batch["zs"])
            fits = need <= HEADROOM * total
        except torch.cuda.OutOfMemoryError:
            need, fits = -1, False
        finally:
            del batch
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if fits:
            return Probe(micro, need, total, where, state)
        if micro == 1:
            gb = 2.0 ** 30
            raise UserError(f"--micro-batch auto: even one image per pass needs {max(need, state) / gb:.2f} GB, over "
                            f"{HEADROOM:.0%} of the {total / gb:.2f} GB budget ({where}); use a smaller model or "
                            f"raise ${BUDGET_ENV}")
        micro = max(d for d in range(1, micro // 2 + 1) if local % d == 0)


def probe_batch(spec, device: torch.device, class_dropout: bool) -> Callable[[int], dict]:
    """Random inputs of the run's shapes for the probe, from their own generator (the global RNG is untouched)."""
    def make(n: int) -> dict:
        g = torch.Generator(device=device).manual_seed(0)
        c, h = spec.in_channels, spec.input_size
        kw = dict(generator=g, device=device)
        ctx = getattr(spec, "context", None)  # text families: a caption context (n, L, D) instead of a label
        y = (torch.randn((n, ctx.length, ctx.dim), **kw) if ctx is not None
             else torch.randint(0, spec.num_classes, (n,), **kw))
        return {"x": torch.randn((n, c, h, h), **kw), "y": y,
                "zs": [torch.randn((n, spec.tokens, d), **kw) for d in spec.z_dims], "t": torch.rand(n, **kw),
                "eps": torch.randn((n, c, h, h), **kw), "drop": torch.zeros(n, dtype=torch.bool, device=device)}
    return make


__all__ = ["BUDGET_ENV", "HEADROOM", "Probe", "budget", "state_bytes", "probe_micro", "probe_batch"]
