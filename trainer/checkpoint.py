"""Atomic checkpoints (RUN/checkpoints/{step:07d}.pt), EMA export, RNG capture and resume."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from manifests import UserError, atomic_open, atomic_write_bytes, atomic_write_json
from manifests.io import remove_tmp_files

CKPT_RE = re.compile(r"^(\d{7})\.pt$")
# Test hook (fault injection): "STEP:SECONDS" sleeps inside the write of checkpoint STEP, after the bytes are in
# the tmp file and before the rename, so a test can SIGKILL the process mid-write.
SLOW_WRITE_ENV = "REPA_TEST_SLOW_CKPT"


def ckpt_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def ckpt_path(run_dir: str | os.PathLike, step: int) -> Path:
    return ckpt_dir(run_dir) / f"{step:07d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished checkpoints, oldest first (tmp files never match)."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(out)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load with weights_only=True on CPU; a bad file is a UserError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"checkpoint not found: {path}") from e
    except Exception as e:  # noqa: BLE001 - truncated zip, foreign pickle: all user-facing
        raise UserError(f"cannot load checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from e


def latest(run_dir: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The newest loadable checkpoint of a run (older ones are the fallback), after clearing tmp leftovers."""
    d = ckpt_dir(run_dir)
    if d.is_dir():
        remove_tmp_files(d)
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return load(path), path
        except UserError as e:
            print(f"warning: skipping unreadable checkpoint: {e}", file=sys.stderr)
    return None


def save(run_dir: str | os.PathLike, step: int, payload: dict[str, Any]) -> Path:
    """Write checkpoint `step` atomically: tmp file, fsync, rename."""
    path = ckpt_path(run_dir, step)
    slow = os.environ.get(SLOW_WRITE_ENV, "")
    with atomic_open(path, "wb") as f:
        try:
            torch.save(payload, f)
        except RuntimeError as e:  # torch's zip writer hides a failed write (disk full) behind a RuntimeError
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        if slow and int(slow.split(":")[0]) == step:
            f.flush()
            print(f"[test hook] slow checkpoint write at step {step}", file=sys.stderr, flush=True)
            time.sleep(float(slow.split(":")[1]))
    return path


def export_ema(run_dir: str | os.PathLike, step: int, ema_state: dict[str, torch.Tensor],
               config: dict[str, Any]) -> Path:
    """RUN/export/ema-{step:07d}.safetensors plus config.json: what sampling needs."""
    from safetensors.torch import save
    out = Path(run_dir) / "export"
    path = out / f"ema-{step:07d}.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ema_state.items()}
    atomic_write_bytes(path, save(tensors, metadata={"step": str(step), "model": str(config.get("model"))}))
    atomic_write_json(out / "config.json", {**config, "step": step})
    return path


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's generator states (the loader is stateless: its randomness comes from (seed, position))."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
