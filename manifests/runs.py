"""The run folder: the names the trainer writes and `python -m evaluation watch` and the sampler follow.

RUN/checkpoints/{step:07d}.pt, RUN/export/ema-{step:07d}.safetensors + config.json, RUN/config.json,
RUN/stats.jsonl, RUN/log.txt, RUN/tb/, RUN/abandoned/, RUN/DONE, and the watcher's RUN/eval/.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

CKPT_DIR = "checkpoints"
CONFIG_NAME = "config.json"  # RUN/config.json and RUN/export/config.json
STATS_NAME = "stats.jsonl"
LOG_NAME = "log.txt"
ABANDONED = "abandoned"  # where --resume-from moves the checkpoints and exports it skips over
EVAL_DIR = "eval"  # the FID watcher's folder
EXPORT_DIR = "export"
EXPORT_RE = re.compile(r"^ema-(\d{7})\.safetensors$")  # RUN/export/ema-0400000.safetensors
DONE_MARKER = "DONE"  # RUN/DONE: the trainer reached its final step
TB_DIR = "tb"  # RUN/tb: the trainer's TensorBoard run; RUN/tb/eval: the watcher's
EVAL_TB_DIR = "tb/eval"


def export_name(step: int) -> str:
    return f"ema-{step:07d}.safetensors"


def list_exports(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished EMA exports of a run, oldest first (tmp files never match)."""
    d = Path(run_dir) / EXPORT_DIR
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := EXPORT_RE.match(p.name)))
