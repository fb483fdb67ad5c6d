"""`python -m trainer train`: one readable loop; setup lives in trainer/runtime.py (DESIGN §4)."""
from __future__ import annotations

import hashlib
import json
import signal
import sys
import time
from typing import Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from manifests import UserError

from . import checkpoint, remote_run
from .config import resolve
from .data import nonfinite_rows
from .plot import draw_loss_png
from .runtime import Run, setup, sync_flag
from .transport import repa_loss


class _Term:
    """SIGTERM (preemption) only raises a flag; the loop saves at the next step boundary and exits 0."""
    requested = False

    @classmethod
    def install(cls):
        def handler(signum, frame):
            cls.requested = True
        cls.requested = False
        return signal.signal(signal.SIGTERM, handler)


def save(r: Run, step: int, state: dict) -> None:
    """Every rank hands in its RNG state; rank 0 writes the checkpoint, the EMA export and loss.png."""
    rng = checkpoint.rng_state(r.device)
    rngs = [rng]
    if r.world > 1:
        rngs = [None] * r.world
        dist.all_gather_object(rngs, rng)
    if r.rank == 0:
        payload = {"model": r.model.state_dict(), "ema": r.ema.state_dict(), "opt": r.opt.state_dict(),
                   "scaler": r.scaler.state_dict(), "step": step, "rng": rngs, "config": r.run_cfg,
                   "skipped": state["skipped"]}
        checkpoint.save(r.cfg.run_dir, step, payload)
        checkpoint.export_ema(r.cfg.run_dir, step, r.ema.state_dict(), r.run_cfg)
        draw_loss_png(r.stats_path, r.run_dir / "loss.png")
        if r.run_url:
            remote_run.push(r.run_dir, r.run_url)  # --run-dir s3://…: whole objects, checkpoint first
    if r.world > 1:
        dist.barrier()
    state["last_ckpt"] = str(checkpoint.ckpt_path(r.cfg.run_dir, step))  # every rank names it in errors


def params_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(r: Run) -> int:
    cfg, step = r.cfg, r.start_step
    state = {"skipped": r.resume_state.get("skipped", 0), "last_ckpt": r.resume_state.get("last_ckpt", "none")}
    trace = None
    if cfg.trace_data:  # debugging aid: which samples each rank saw at each step, and its final weights
        (r.run_dir / "trace").mkdir(exist_ok=True)
        trace = open(r.run_dir / "trace" / f"rank{r.rank}.jsonl", "a")
    pbar = tqdm(total=cfg.steps, initial=step, unit="step", disable=r.rank != 0, dynamic_ncols=True, desc="train")
    try:
        step = _loop(r, cfg, step, state, pbar, trace)
    finally:
        pbar.close()
        if trace is not None:
            trace.close()
    if trace is not None:
        with open(r.run_dir / "trace" / f"rank{r.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "params_sha256": params_digest(r.model)}) + "\n")
    if _Term.requested and step < cfg.steps and r.rank == 0:
        print(f"SIGTERM: saved checkpoint at step {step}; re-run the same command to resume", file=sys.stderr)
    return 0


def _loop(r: Run, cfg, step: int, state: dict, pbar, trace) -> int:
    """Report, checkpoint, stop?, step -- until done; returns the final step."""
    streak, last_saved, due = 0, step, False
    acc = torch.zeros(4, device=r.device, dtype=torch.float64)  # loss, denoise, proj sums; steps since report
    steps_since, images, data_wait, skipped_since, t_report = 0, 0, 0.0, 0, time.perf_counter()
    grad_norm, loader = float("nan"), iter(r.loader)
    while True:
        stop = sync_flag(r, _Term.requested)
        # 1. Report status.
        if steps_since and (step % cfg.log_every == 0 or step >= cfg.steps or stop):
            if r.world > 1:
                dist.all_reduce(acc)
            n = max(acc[3].item(), 1.0)
            now = time.perf_counter()
            row = {"step": step, "loss": acc[0].item() / n, "denoise": acc[1].item() / n,
                   "proj_loss": acc[2].item() / n, "grad_norm": grad_norm, "loss_scale": r.scaler.get_scale()
                   if r.scaler.is_enabled() else 1.0, "skipped": state["skipped"], "skipped_interval": skipped_since,
                   "lr": cfg.lr, "img_per_s": images * r.world / (now - t_report), "data_wait_s": data_wait,
                   "time": time.time()}
            if r.rank == 0:
                with open(r.stats_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                pbar.set_postfix(loss=f"{row['loss']:.4f}", proj=f"{row['proj_loss']:.4f}",
                                 img_s=f"{row['img_per_s']:.1f}")
            acc.zero_()
            steps_since, images, data_wait, skipped_since, t_report = 0, 0, 0.0, 0, time.perf_counter()
        # 2. Save a checkpoint; 3. done?
        due = due or (step != last_saved and step % cfg.ckpt_every == 0)
        # A periodic checkpoint waits while steps are being skipped, so the last one saved stays a good one.
        if step != last_saved and ((due and streak == 0) or step >= cfg.steps or stop):
            save(r, step, state)
            last_saved, due = step, False
        if step >= cfg.steps or stop:
            break
        # 4. One optimiser step over this rank's micro-batches (grad accumulation when more than one).
        inputs_bad = []
        for micro in range(r.n_micro):
            t0 = time.perf_counter()
            batch = next(loader)
            data_wait += time.perf_counter() - t0
            assert batch["step"] == step, f"loader at step {batch['step']}, loop at {step}"
            if trace is not None:
                trace.write(json.dumps({"step": step, "micro": micro, "keys": batch["keys"]}) + "\n")
            x = batch["x"].to(r.device, non_blocking=True)  # (n, C, H, W)
            y = batch["y"].to(r.device, non_blocking=True)  # (n,)
            zs = [z.to(r.device, non_blocking=True).float() for z in batch["zs"]]  # (n, T, z_dim) each
            # Checked on the device; only read back when the step turns out non-finite (no sync otherwise).
            inputs_bad.append((batch["keys"], nonfinite_rows(x, zs, cfg.encoders)))
            with r.no_sync(micro < r.n_micro - 1):
                out = repa_loss(r.net, x, y, zs, path=cfg.path, proj_coeff=cfg.proj_coeff,
                                proj_loss=cfg.proj_loss, ntxent_tau=cfg.ntxent_tau, amp=r.amp)
                r.scaler.scale(out.total * (x.shape[0] / r.local_batch)).backward()
            # The loader reuses its buffers (a ring): make sure this one was not overwritten while in use.
            assert int(batch["tag"]) == batch["pos0"], "loader buffer overwritten while in use"
            w = x.shape[0] / r.local_batch
            acc[:3] += torch.stack([out.total.detach(), out.denoise.detach(), out.proj.detach()]).double() * w
            images += x.shape[0]
        r.scaler.unscale_(r.opt)
        gn = torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.grad_clip)
        finite = bool(torch.isfinite(gn))  # identical on every rank: grads are already all-reduced
        scale = r.scaler.get_scale() if r.scaler.is_enabled() else 1.0
        if r.scaler.is_enabled():
            r.scaler.step(r.opt)  # skips the update itself when it found inf/NaN
            r.scaler.update()
        elif finite:
            r.opt.step()
        r.opt.zero_grad(set_to_none=True)
        r.update_ema()
        step += 1
        acc[3] += 1
        steps_since += 1
        pbar.update(1)
        if finite:
            streak, grad_norm = 0, gn.item()
            continue
        for keys, fields in inputs_bad:  # corrupt data (a NaN latent, say) stops the run, naming the sample
            for field, rows in fields:
                if bool(rows.any()):
                    key = keys[int(rows.nonzero()[0, 0])]
                    raise UserError(f"step {step}: sample '{key}' has non-finite values in field '{field}' "
                                    f"(corrupt shard?); last good checkpoint: {state['last_ckpt']}")
        streak += 1
        skipped_since += 1
        state["skipped"] += 1
        if r.rank == 0:
            what = (f"fp16 overflow, loss scale {scale:g} -> {r.scaler.get_scale():g}" if r.scaler.is_enabled()
                    else "non-finite gradients")
            tqdm.write(f"step {step}: {what}; update skipped ({state['skipped']} skipped so far)", file=sys.stderr)
        if streak >= cfg.max_nonfinite:
            raise UserError(f"step {step}: loss/gradients non-finite for {streak} consecutive steps (since step "
                            f"{step - streak + 1}); stopping. Last good checkpoint: {state['last_ckpt']}")
    return step


def main(argv: Sequence[str] | None = None) -> int:
    cfg, dry = resolve(list(argv or []))
    r = setup(cfg, dry_run=dry)
    if r is None:  # --dry-run printed the resolved config
        return 0
    previous = _Term.install()
    try:
        return train(r)
    finally:
        signal.signal(signal.SIGTERM, previous)
        r.close()


__all__ = ["main", "train", "save"]
