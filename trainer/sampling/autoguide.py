"""Autoguidance (Karras et al. 2024, DESIGN §9): guide the main model with a weaker one instead of its own
unconditional branch, D_w = D_guide + w·(D_main − D_guide).

CFG is the special case where the guide is the main model with the null label. Every sampler here builds its CFG
batch the same way, `x_in = [x; x]` and `y_in = [y; null]` (trainer/sampling/samplers.py `velocity`,
trainer/sampling/ddpm.py `model_output`), and mixes `u + w·(c − u)` from the two halves. `AutoGuided` stands in for
the model in that call: the first half goes to the main model and the second half to the guide, with the
*conditional* labels, so the samplers' own mixing (the guidance interval and DiT's channel rule included) yields
autoguidance unchanged. Outside the interval the samplers call the main model alone.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from common import UserError
from manifests import storage
from manifests.runs import CKPT_DIR, EXPORT_DIR, export_name

GUIDE_RE = re.compile(r"^(?P<path>.+)@(?P<step>\d+)$")


def resolve_guide(text: str) -> str:
    """`--guide-ckpt PATH_OR_RUN@STEP` -> the file to load: RUN@STEP is the run's EMA export at STEP (else its
    training checkpoint at STEP); a file or a run folder without @STEP is read as `--ckpt` reads it."""
    m = GUIDE_RE.match(text)
    if m is None:
        return text
    run, step = m.group("path"), int(m.group("step"))
    if storage.is_url(run):
        return f"{run.rstrip('/')}/{EXPORT_DIR}/{export_name(step)}"
    root = Path(run)
    if not root.is_dir():
        raise UserError(f"--guide-ckpt {text}: {run} is not a run folder (RUN@STEP names a step of a run)")
    for p in (root / EXPORT_DIR / export_name(step), root / CKPT_DIR / f"{step:07d}.pt"):
        if p.is_file():
            return str(p)
    have = sorted(p.name for p in (root / EXPORT_DIR).glob("ema-*.safetensors")) if (root / EXPORT_DIR).is_dir() \
        else []
    raise UserError(f"--guide-ckpt {text}: run {run} has no export or checkpoint at step {step} "
                    f"(exports: {', '.join(have) or 'none'})")


def check_compatible(main: torch.nn.Module, guide: torch.nn.Module, main_name: str, guide_name: str) -> None:
    """The guide must denoise the same latents under the same conditioning; its size may differ."""
    for attr in ("in_channels", "input_size", "num_classes"):
        a, b = getattr(main, attr, None), getattr(guide, attr, None)
        if a != b:
            raise UserError(f"--guide-ckpt: the guide {guide_name} has {attr} {b}, the main model {main_name} has "
                            f"{a}; autoguidance needs the same latent shape and classes")


class AutoGuided:
    """The sampler's model for autoguidance: [x; x], [y; null] -> [main(x, y); guide(x, y)] (see the module doc)."""

    def __init__(self, main: Callable, guide: Callable, null_class: int | torch.Tensor):
        """`null_class`: the null label, or a text family's empty context (L, D)."""
        self.main, self.guide, self.null_class = main, guide, null_class
        self.num_classes = getattr(main, "num_classes", None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        n = x.shape[0] // 2
        cfg_batch = x.shape[0] == 2 * n and n > 0 and bool((y[n:] == _as(self.null_class, y)).all())
        if not cfg_batch:  # outside the guidance interval (or w = 1): the main model alone
            return self.main(x, t, y)
        # Each half is its own model's forward: the two networks cannot share one batch anyway.
        out_main = _first(self.main(x[:n], t[:n], y[:n]))  # (N, C', H, W)
        out_guide = _first(self.guide(x[n:], t[n:], y[:n]))  # (N, C', H, W), the conditional labels
        return torch.cat([out_main, out_guide.to(out_main.dtype)], 0), ()


def _as(null, y: torch.Tensor):
    return null.to(device=y.device, dtype=y.dtype) if torch.is_tensor(null) else null


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
