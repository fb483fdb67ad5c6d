"""`python -m trainer train`: one readable loop; setup lives in trainer/loop/runtime.py (DESIGN §4)."""
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

from common import UserError

from trainer.data.indexed import cond_to_device, nonfinite_rows, tokens_to_device
from trainer.loop import checkpoint, remote_run
from trainer.loop.config import resolve
from trainer.loop.health import Health
from trainer.loop.monitor import Monitor
from trainer.loop.runtime import Run, setup
from trainer.loop.steprng import posterior


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
    """Every rank hands in its RNG state; rank 0 writes the checkpoint and the EMA export, then prunes old ones."""
    rng = checkpoint.rng_state(r.device)
    rngs = [rng]
    if r.world > 1:
        rngs = [None] * r.world
        dist.all_gather_object(rngs, rng)
    if r.rank == 0:
        r.monitor.before_save()
        payload = {"model": r.model.state_dict(), "ema": r.ema.state_dict(), "opt": r.opt.state_dict(),
                   "scaler": r.scaler.state_dict(), "step": step, "rng": rngs, "config": r.run_cfg,
                   "skipped": state["skipped"]}
        checkpoint.save(r.run_dir, step, payload)
        checkpoint.export_ema(r.run_dir, step, r.ema.state_dict(), r.run_cfg)
        r.monitor.saved(step)  # retention (only now that the new one is durable), log.txt
        if r.run_url:
            remote_run.push(r.run_dir, r.run_url)  # --run-dir s3://…: whole objects, checkpoint first
    if r.world > 1:
        dist.barrier()
    state["last_ckpt"] = str(checkpoint.ckpt_path(r.run_dir, step))  # every rank names it in errors


def append_line(path, line: str) -> None:
    """Append one line whole or not at all: on a full disk the file is cut back and the error names it."""
    import os
    from common.errors import os_error_message
    data = (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                os.ftruncate(fd, start)  # no half line for readers of stats.jsonl
                raise
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {os_error_message(e, path)}") from e


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
    r.monitor = Monitor(r)  # log.txt, tracker, sample grids, loss.png, DONE (rank 0)
    pbar = tqdm(total=cfg.steps, initial=step, unit="step", disable=r.rank != 0, dynamic_ncols=True, desc="train")
    try:
        step = _loop(r, cfg, step, state, pbar, trace)
    except Exception as e:
        r.monitor.log.line(f"error: {e}")
        raise
    finally:
        pbar.close()
        if trace is not None:
            trace.close()
        r.monitor.close(step)
    if trace is not None:
        with open(r.run_dir / "trace" / f"rank{r.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "params_sha256": params_digest(r.model)}) + "\n")
    if _Term.requested and step < cfg.steps and r.rank == 0:
        print(f"SIGTERM: saved checkpoint at step {step}; re-run the same command to resume", file=sys.stderr)
    return 0


def _loop(r: Run, cfg, step: int, state: dict, pbar, trace) -> int:
    """Report, checkpoint, stop?, step -- until done; returns the final step."""
    last_saved, due = step, False
    health = Health(r.device, r.rank, cfg.max_nonfinite, cfg.precision == "fp16", skipped=state["skipped"],
                    warn=r.monitor.warn)
    health.last_ckpt = state["last_ckpt"]
    acc = torch.zeros(4, device=r.device, dtype=torch.float64)  # loss, denoise, proj sums; steps since report
    steps_since, images, data_wait, t_report = 0, 0, 0.0, time.perf_counter()
    loader, objective_loss = iter(r.loader), r.family.objective.loss
    while True:
        # The step's flags are read back a step late (no sync); a boundary that reports or may save reads them all.
        if (step >= cfg.steps or step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or due
                or health.stop or (r.world == 1 and _Term.requested)):
            health.settle()
        stop = _Term.requested if r.world == 1 else health.stop  # with ranks: all-reduced, so all stop together
        state["skipped"] = health.skipped
        # 1. Report status.
        r.monitor.preview(step)  # EMA sample grid every --sample-every steps
        if steps_since and (step % cfg.log_every == 0 or step >= cfg.steps or stop):
            if r.world > 1:
                dist.all_reduce(acc)
            loss, denoise, proj, n = acc.tolist()  # one sync per report
            n = max(n, 1.0)
            now = time.perf_counter()
            row = {"step": step, "loss": loss / n, "denoise": denoise / n, "proj_loss": proj / n,
                   "grad_norm": health.grad_norm, "loss_scale": r.scaler.get_scale() if r.scaler.is_enabled()
                   else 1.0, "skipped": health.skipped, "skipped_interval": health.take_interval(), "lr": cfg.lr,
                   "img_per_s": images * r.world / (now - t_report), "data_wait_s": data_wait,
                   "micro_batch": r.micro, "time": time.time()}
            if r.rank == 0:
                r.monitor.report(row)  # adds the grid time; tracker, log.txt, loss.png
                append_line(r.stats_path, json.dumps(row))
                pbar.set_postfix(loss=f"{row['loss']:.4f}", proj=f"{row['proj_loss']:.4f}",
                                 img_s=f"{row['img_per_s']:.1f}")
            acc.zero_()
            steps_since, images, data_wait, t_report = 0, 0, 0.0, time.perf_counter()
        # 2. Save a checkpoint; 3. done?
        due = due or (step != last_saved and step % cfg.ckpt_every == 0)
        # A periodic checkpoint waits while steps are being skipped, so the last one saved stays a good one.
        if step != last_saved and ((due and health.streak == 0) or step >= cfg.steps or stop):
            save(r, step, state)
            last_saved, due, health.last_ckpt = step, False, state["last_ckpt"]
        if step >= cfg.steps or stop:
            break
        # 4. One optimiser step over this rank's micro-batches (grad accumulation when more than one). Its
        # randomness is the global batch's, drawn from (seed, step); this rank keeps its own rows.
        noise, inputs = r.rand.draw(step), []
        for micro in range(r.n_micro):
            t0 = time.perf_counter()
            batch = next(loader)
            data_wait += time.perf_counter() - t0
            assert batch["step"] == step, f"loader at step {batch['step']}, loop at {step}"
            if trace is not None:  # text families also log each sample's caption index
                picked = {"captions": batch["captions"]} if "captions" in batch else {}
                trace.write(json.dumps({"step": step, "micro": micro, "keys": batch["keys"], **picked}) + "\n")
            moments = batch["x"].to(r.device, non_blocking=True)  # (n, 2C, H, W): VAE mean then std
            y = cond_to_device(batch, r.device)  # (n,) labels, or (n, L, D) caption contexts decoded on the device
            zs = tokens_to_device(batch, r.device)  # (n, T, z_dim) fp32 each, 8-bit codes decoded on the device
            n = moments.shape[0]
            nz = noise.rows(r.rank * r.local_batch + micro * r.micro, n)
            x = posterior(moments, nz.post, r.latent_scale, r.latent_shift)  # (n, C, H, W)
            # Checked on the device; only read back when the step turns out non-finite (no sync otherwise).
            bad = nonfinite_rows(moments, zs, r.encoders)
            if r.context is not None:  # a corrupt context names its field too
                bad.append((r.context, ~torch.isfinite(y).flatten(1).all(1)))
            inputs.append((batch["keys"], bad))
            with r.no_sync(micro < r.n_micro - 1):  # the family's objective (SiT: the interpolant + REPA term)
                out = objective_loss(r.net, x, y, zs, path=cfg.path, proj_coeff=cfg.proj_coeff,
                                     proj_loss=cfg.proj_loss, ntxent_tau=cfg.ntxent_tau, amp=r.amp, t=nz.t,
                                     eps=nz.eps, drop=nz.drop, **r.cond_kw)
                r.scaler.scale(out.total * (n / r.local_batch)).backward()
            # The loader reuses its buffers (a ring): make sure this one was not overwritten while in use.
            assert int(batch["tag"]) == batch["pos0"], "loader buffer overwritten while in use"
            acc[:3] += torch.stack([out.total.detach(), out.denoise.detach(), out.proj.detach()]).double() * (
                n / r.local_batch)
            images += n
        r.scaler.unscale_(r.opt)
        gn = torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.grad_clip)  # identical on every rank
        scale_before = r.loss_scale()
        r.optimizer_step(~torch.isfinite(gn))  # skipped on the device when non-finite
        r.opt.zero_grad(set_to_none=True)
        r.update_ema()
        health.record(step + 1, gn, scale_before, r.loss_scale(), stop_flag(r, _Term.requested), inputs)
        step += 1
        acc[3] += 1
        steps_since += 1
        pbar.update(1)
        health.settle(keep=1)  # the previous step's flags: the GPU is busy with this one meanwhile
    return step


def stop_flag(r: Run, flag: bool) -> torch.Tensor:
    """This rank's SIGTERM flag, all-reduced (max) on the device; read back with the step's other flags."""
    t = torch.full((), float(flag), device=r.device)
    if r.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


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
