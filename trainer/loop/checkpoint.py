"""Atomic checkpoints (RUN/checkpoints/{step:07d}.pt), EMA export, RNG capture, resume and retention."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import UserError
from manifests import atomic_open, atomic_write_bytes, atomic_write_json
from manifests.io import fsync_dir, remove_tmp_files
from manifests.runs import ABANDONED, CKPT_DIR, CONFIG_NAME, EXPORT_DIR, export_name, list_exports

CKPT_RE = re.compile(r"^(\d{7})\.pt$")
# Test hook (fault injection): "STEP:SECONDS" sleeps after checkpoint STEP is durable and before pruning.
PAUSE_PRUNE_ENV = "REPA_TEST_PAUSE_PRUNE"
# Test hook (fault injection): "STEP:SECONDS" sleeps inside the write of checkpoint STEP, after the bytes are in
# the tmp file and before the rename, so a test can SIGKILL the process mid-write.
SLOW_WRITE_ENV = "REPA_TEST_SLOW_CKPT"


def ckpt_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CKPT_DIR


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
    out = Path(run_dir) / EXPORT_DIR
    path = out / export_name(step)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ema_state.items()}
    atomic_write_bytes(path, save(tensors, metadata={"step": str(step), "model": str(config.get("model"))}))
    atomic_write_json(out / CONFIG_NAME, {**config, "step": step})
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


# ---- resume control and retention ------------------------------------------------------------------------------

def find_resume(run_dir: str | os.PathLike, resume_from: str | None) -> tuple[dict[str, Any], Path] | None:
    """--resume-from PATH|STEP, else the newest loadable checkpoint of the run (None: a fresh run)."""
    if resume_from is None:
        return latest(run_dir)
    text = str(resume_from).strip()
    if text.isdigit():
        path = ckpt_path(run_dir, int(text))
        if not path.is_file():
            have = [s for s, _ in list_checkpoints(run_dir)]
            raise UserError(f"--resume-from {text}: no checkpoint for step {int(text)} in {ckpt_dir(run_dir)} "
                            f"(have: {', '.join(map(str, have)) or 'none'})")
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(f"--resume-from {text}: file not found")
    return load(path), path


def abandon_newer(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Move checkpoints and exports newer than `step` into */abandoned/ (kept, but never resumed from again)."""
    moved = []
    for items, folder in ((list_checkpoints(run_dir), ckpt_dir(run_dir)),
                          (list_exports(run_dir), Path(run_dir) / EXPORT_DIR)):
        newer = [p for s, p in items if s > step]
        for p in newer:
            dest = folder / ABANDONED / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dest)
            moved.append(dest)
        if newer:
            fsync_dir(folder)
    return moved


def kept_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The retention rule: the newest keep_last, every multiple of keep_every, and always the newest one."""
    steps = sorted(steps)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    if steps:
        keep.add(steps[-1])
    return keep


def prune(run_dir: str | os.PathLike, keep_last: int, keep_every: int) -> list[Path]:
    """Delete checkpoints and EMA exports outside the rule. Call only once the newest is durable (after save)."""
    newest = list_checkpoints(run_dir)
    pause = os.environ.get(PAUSE_PRUNE_ENV, "")
    if pause and newest and int(pause.split(":")[0]) == newest[-1][0]:
        print(f"[test hook] pausing before pruning at step {newest[-1][0]}", file=sys.stderr, flush=True)
        time.sleep(float(pause.split(":")[1]))
    removed = []
    for items in (newest, list_exports(run_dir)):
        keep = kept_steps([s for s, _ in items], keep_last, keep_every)
        for s, p in items:
            if s not in keep:
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
