"""Run trackers (`--report-to tensorboard|wandb|none`) and RUN/log.txt; the run folder's names are in
`manifests/runs.py`.

TensorBoard is the default and writes RUN/tb/. A resumed run opens its writer with `purge_step` = the
checkpoint's step + 1: TensorBoard's reader then drops whatever the lost run logged after the checkpoint,
so the curves continue with no duplicated or out-of-order steps. The FID watcher logs into its own run
folder (RUN/tb/eval), so a trainer restart never purges its points.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from manifests.io import atomic_write_bytes

SKIP_KEYS = ("step", "time")  # stats.jsonl keys that are not curves
WANDB_ID_FILE = "wandb-id.txt"


class Tracker:
    """The no-op tracker (`--report-to none`); the others override what they support."""

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train/") -> None:
        pass

    def image(self, tag: str, step: int, img: np.ndarray) -> None:
        """img: uint8 (H, W, 3)."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The curve-worthy entries of a stats row: finite or not, but numbers (bools are not)."""
    return {k: float(v) for k, v in values.items()
            if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard(Tracker):
    def __init__(self, log_dir: Path, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is a declared dependency; a broken env still gets one line
            raise UserError(f"--report-to tensorboard: cannot import tensorboard ({e}); pip install tensorboard "
                            f"or use --report-to none") from e
        self.w = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=60)

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train/") -> None:
        for k, v in numeric(values).items():
            self.w.add_scalar(prefix + k, v, step)

    def image(self, tag: str, step: int, img: np.ndarray) -> None:
        self.w.add_image(tag, img, step, dataformats="HWC")

    def flush(self) -> None:
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandB(Tracker):
    """Weights & Biases, when installed; the run id is kept in RUN/tb/wandb-id.txt so a resume continues it."""

    def __init__(self, log_dir: Path, config: dict[str, Any], name: str):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb: the wandb package is not installed (pip install wandb), "
                            "or use --report-to tensorboard") from None
        self.wandb = wandb
        log_dir.mkdir(parents=True, exist_ok=True)
        id_file = log_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        atomic_write_bytes(id_file, run_id.encode())
        # W&B drops points whose step is below its last one: after a resume the lost steps stay as logged.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "repa"), id=run_id, resume="allow",
                              name=name, dir=str(log_dir), config=config)

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train/") -> None:
        self.run.log({prefix + k: v for k, v in numeric(values).items()}, step=step)

    def image(self, tag: str, step: int, img: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(img)}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, log_dir: str | os.PathLike, *, purge_step: int | None = None,
                 config: dict[str, Any] | None = None, name: str = "") -> Tracker:
    """The tracker for `--report-to KIND` writing under log_dir (RUN/tb or RUN/tb/eval)."""
    log_dir = Path(log_dir)
    if kind == "tensorboard":
        return TensorBoard(log_dir, purge_step)
    if kind == "wandb":
        return WandB(log_dir, config or {}, name or log_dir.parent.name)
    if kind == "none":
        return Tracker()
    raise UserError(f"--report-to {kind}: choose tensorboard, wandb or none")


class RunLog:
    """RUN/log.txt: timestamped lines, never a carriage return, for batch systems nobody watches."""

    def __init__(self, path: str | os.PathLike | None):
        self.f = open(path, "a", buffering=1, encoding="utf-8") if path is not None else None

    def line(self, text: str, echo: bool = False) -> None:
        """Append text (several lines allowed); echo=True also prints it on stderr above the progress bar."""
        if echo:
            from tqdm import tqdm
            tqdm.write(text, file=sys.stderr)
        if self.f is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        for ln in text.replace("\r", "\n").splitlines():
            if ln.strip():
                self.f.write(f"{stamp} {ln}\n")

    def row(self, row: dict[str, Any]) -> None:
        """One stats.jsonl row as one readable line."""
        parts = [f"step {row.get('step')}"]
        for k, v in row.items():
            if k in SKIP_KEYS:
                continue
            parts.append(f"{k} {_fmt(v)}")
        self.line(" | ".join(parts))

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


__all__ = ["Tracker", "TensorBoard", "WandB", "open_tracker", "RunLog", "numeric"]
