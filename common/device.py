"""One `--device` for every command: auto, cpu, cuda or cuda:N, checked when parsed and resolved when run."""
from __future__ import annotations

import argparse
import re

from .errors import UserError

DEVICE_HELP = "auto (CUDA if available, else cpu), cpu, cuda or cuda:N"
_SYNTAX = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_flag(text: str) -> str:
    """argparse type: the spelling only (no torch import while parsing)."""
    name = text.strip().lower()
    if not _SYNTAX.match(name):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_HELP.replace(' (CUDA if available, else cpu)', '')}, "
                                          f"got {text!r}")
    return name


def resolve_device(name: str | None, local_rank: int = 0) -> str:
    """'auto' (or None) -> 'cuda' / 'cuda:LOCAL_RANK' when CUDA is there, else 'cpu'; an unusable CUDA device is a
    UserError naming the flag."""
    import torch
    try:
        name = "auto" if name is None else device_flag(name)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"--device: {e}") from None
    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{local_rank}" if local_rank else "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available (use --device cpu)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


__all__ = ["DEVICE_HELP", "device_flag", "resolve_device"]
