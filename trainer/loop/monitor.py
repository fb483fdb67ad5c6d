"""The loop's window to the outside (rank 0): RUN/log.txt, the tracker, sample grids, loss.png and RUN/DONE.

The loop calls four hooks: `preview(step)` and `report(row)` while reporting, `before_save()`/`saved()` around a
checkpoint, `warn(text)` for anything a person should see, and `close(step)` at the end. Other ranks get the
same object with every output switched off, so the loop needs no rank checks for it.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from manifests import atomic_write_bytes, atomic_write_json
from manifests.runs import DONE_MARKER as DONE
from manifests.runs import LOG_NAME, TB_DIR
from common.tracking import RunLog, Tracker, open_tracker

from trainer.loop import checkpoint
from trainer.loop.plot import draw_loss_png, read_stats
from trainer.loop.preview import Preview, grid_path, save_png

PLOT_BUDGET = 0.05  # loss.png at every log interval, unless drawing would take more than 5% of the time


class Monitor:
    def __init__(self, r):
        self.r, self.cfg, self.on = r, r.cfg, r.rank == 0
        self.log = RunLog(r.run_dir / LOG_NAME if self.on else None)
        self.tracker: Tracker = Tracker()
        self.preview_s = 0.0  # grid time since the last stats row (reported there as sample_grid_s)
        self.rows: list[dict] = []
        self.plot_s, self.t_plot, self.last_draw_s = 0.0, 0.0, 0.0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loss-png")  # Agg + Figure: thread-safe
        self.drawing: Future | None = None
        self.grids: Preview | None = None
        if not self.on:
            return
        cfg, start = self.cfg, r.start_step
        self.log.line(f"start: {shlex.join(sys.argv)}")
        self.log.line(f"host {platform.node()} pid {os.getpid()} ranks {r.world} device {r.device} "
                      f"torch {_torch_version()}")
        self.log.line("resolved config: " + json.dumps(r.run_cfg, sort_keys=True))
        if start:
            self.log.line(f"resumed from {r.resume_state.get('last_ckpt')} at step {start}")
        done = r.run_dir / DONE
        if done.exists() and start < cfg.steps:
            done.unlink()  # the run goes on (e.g. --steps raised): the watcher must keep following it
        # Resuming: TensorBoard drops what the lost run logged after the checkpoint (purge_step), so the
        # curves continue without duplicated or out-of-order steps; a fresh run purges everything.
        self.tracker = open_tracker(cfg.report_to, r.run_dir / TB_DIR, purge_step=start + 1 if start else 0,
                                    config=r.run_cfg, name=r.run_dir.name)
        self.rows = [row for row in read_stats(r.stats_path) if row.get("step", 0) <= start]
        if cfg.sample_every and cfg.sample_every <= cfg.steps:  # a run that draws no grid never loads the VAE
            self.grids = Preview(r.run_cfg, cfg.sample_grid, cfg.sample_steps, r.device)
            if self.grids.prompts is not None:  # text families: what each grid cell was asked, in reading order
                (r.run_dir / "samples").mkdir(exist_ok=True)
                atomic_write_bytes(r.run_dir / "samples" / "prompts.txt",
                                   "".join(p + "\n" for p in self.grids.prompts).encode())
            try:
                self.grids.load_vae()  # now, so a VAE that will not load shows before step 0
            except Exception as e:  # noqa: BLE001 - a preview must never stop a multi-day run
                self.warn(f"warning: sample grids off: cannot load the run's VAE '{self.grids.vae_name}': {e}")
                self.grids = None

    # ---- 1. report ---------------------------------------------------------------------------------------
    def preview(self, step: int) -> None:
        """An EMA sample grid at multiples of --sample-every, step 0 included as the baseline (not again on resume).

        Runs shorter than --sample-every get none, so short test runs pay nothing for it.
        """
        if self.grids is None or (step == self.r.start_step and step > 0):
            return
        if step % self.cfg.sample_every or self.cfg.sample_every > self.cfg.steps:
            return
        t0 = time.perf_counter()
        img = self.grids.grid(self.r.ema)
        path = grid_path(self.r.run_dir, step)
        save_png(img, path)
        self.tracker.image("samples/ema", step, img)
        dt = time.perf_counter() - t0
        self.preview_s += dt
        self.log.line(f"step {step}: sample grid {path.name} ({dt:.2f} s, {self.cfg.sample_steps} "
                      f"{self.grids.record.family.default_sampler} steps)")

    def report(self, row: dict[str, Any]) -> None:
        """Complete a stats row (grid time), then tracker, log.txt and loss.png; stats.jsonl is the caller's."""
        if not self.on:
            return
        row["sample_grid_s"] = round(self.preview_s, 4)
        row["plot_s"] = round(self.plot_s, 4)
        self.preview_s = self.plot_s = 0.0
        self.tracker.scalars(row["step"], row)
        self.log.row(row)
        self.rows.append(dict(row))
        self.plot(force=False)

    def plot(self, force: bool) -> None:
        """Redraw loss.png in a background thread (the loop never waits for matplotlib): at every log interval,
        unless the last draw took more than PLOT_BUDGET of the time since; force=True waits for the draw."""
        busy = self.drawing is not None and not self.drawing.done()
        if not force and (busy or (self.t_plot and self.last_draw_s > PLOT_BUDGET * (time.perf_counter() -
                                                                                      self.t_plot))):
            return
        if busy:
            self.drawing.result()
        self.drawing = self.pool.submit(self._draw, list(self.rows))
        if force:
            self.drawing.result()

    def _draw(self, rows: list[dict]) -> None:
        t0 = time.perf_counter()
        try:
            draw_loss_png(self.r.stats_path, self.r.run_dir / "loss.png", rows=rows)
        except Exception as e:  # noqa: BLE001 - a plot must never stop a run
            self.log.line(f"warning: loss.png not drawn: {e}")
        self.t_plot, self.last_draw_s = time.perf_counter(), time.perf_counter() - t0
        self.plot_s += self.last_draw_s

    # ---- 2. save -----------------------------------------------------------------------------------------
    def before_save(self) -> None:
        """Tracker events up to this step reach the disk before the checkpoint that a resume continues from."""
        self.tracker.flush()

    def saved(self, step: int) -> None:
        """After checkpoint and export are durable: retention and the log line."""
        if not self.on:
            return
        gone = checkpoint.prune(self.r.run_dir, self.cfg.keep_last, self.cfg.keep_every)
        kept = [s for s, _ in checkpoint.list_checkpoints(self.r.run_dir)]
        self.log.line(f"step {step}: saved {checkpoint.ckpt_path(self.r.run_dir, step)}"
                      + (f"; pruned {', '.join(p.name for p in gone)}" if gone else "")
                      + f"; kept steps {kept}")

    # ---- anything else -------------------------------------------------------------------------------------
    def warn(self, text: str) -> None:
        """A line a person should see: stderr (above the progress bar) and log.txt."""
        if self.on:
            self.log.line(text, echo=True)

    def close(self, step: int) -> None:
        if not self.on:
            return
        self.plot(force=True)
        self.pool.shutdown()
        if step >= self.cfg.steps:
            atomic_write_json(self.r.run_dir / DONE, {"step": step, "time": time.time()})
            self.log.line(f"step {step}: done (wrote {DONE})")
        else:
            self.log.line(f"step {step}: stopped before step {self.cfg.steps}; re-run the same command to resume")
        self.tracker.close()
        self.log.close()


def _torch_version() -> str:
    import torch
    return torch.__version__


__all__ = ["Monitor", "DONE", "grid_path"]
