"""`python -m evaluation watch RUN --reference REF`: FID, sFID, IS, P/R (and FD_DINOv2) of each new EMA export.

For each export RUN/export/ema-NNNNNNN.safetensors newer than the last evaluated step, it samples with
`python -m trainer sample` (a subprocess: torchrun with --num-gpus > 1; finished shards survive a kill), runs
the metrics job on the samples, logs the numbers to the run's tracker (RUN/tb/eval) and only then appends
a row to RUN/eval/metrics.jsonl and redraws RUN/eval/fid.png. A killed watcher re-run skips finished rows and
reuses finished sample shards; an unfinished evaluation never becomes a row. It stops with --once, at
RUN/DONE (written by the trainer at its final step) or at --until STEP.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from common import UserError, check
from manifests import atomic_write_bytes, read_json
from common.cli import ArgumentParser, PlainHelpFormatter, flag, nonneg_int, positive_float, positive_int, print_config
from common.config_file import add_run_flags, config_values
from common.device import DEVICE_HELP, device_flag
from manifests.runs import DONE_MARKER, EVAL_TB_DIR, list_exports
from common.tracking import open_tracker

from evaluation.config import metric_list

METRICS = ("fid", "sfid", "is", "precision", "recall", "fd_dinov2", "clip_score")  # report keys kept in a row (when present)
EXAMPLE = """examples:
  python -m evaluation watch runs/xl --reference VIRTUAL_imagenet256_labeled.npz          # follow until DONE
  python -m evaluation watch runs/xl --reference ref.npz --once --num-samples 50000 --num-gpus 8
Rows go to RUN/eval/metrics.jsonl, the plot to RUN/eval/fid.png, the curves to the run's tracker (RUN/tb/eval)."""


SAMPLE_PRECISIONS = ("fp32", "tf32", "bf16")  # trainer sample --precision
BATCH_PER_GPU = 64  # the default global sampling batch is this times --num-gpus


@dataclass(kw_only=True)
class WatchConfig:
    """`python -m evaluation watch` settings."""
    run: str = ""
    reference: str = ""
    once: bool = False
    latest: bool = False
    until: int | None = None
    poll: float = 300.0
    num_samples: int = 10_000
    num_steps: int = 250  # sampler steps
    cfg_scale: float = 1.0
    guidance_high: float = 1.0
    seed: int = 0
    num_gpus: int = 1  # sampling processes (torchrun), one per GPU
    batch_size: int | None = None  # global sampling batch; None: BATCH_PER_GPU x num_gpus
    precision: str = "tf32"  # of the sampler (trainer sample --precision)
    inception_weights: str | None = None
    metrics: list[str] | None = None  # the metrics job's --metrics (default: its own, fd_dinov2 when its weights are here)
    dinov2: str | None = None
    resize: str | None = None
    eval_batch_size: int = 100
    device: str = "auto"
    report_to: str | None = None
    cache_dir: str | None = None
    keep_samples: bool = False
    # text-to-image runs: the captions each export samples from, and the CLIP score's model
    prompts: str | None = None
    captions: str | None = None
    clip_model: str | None = None


def build_parser() -> argparse.ArgumentParser:
    d = WatchConfig()
    p = ArgumentParser(prog="python -m evaluation watch", formatter_class=PlainHelpFormatter,
                       description="Evaluate every new EMA export of a training run (FID over training).",
                       epilog=EXAMPLE)
    p.add_argument("run", nargs="?", help="the run folder (RUN/export/ema-*.safetensors), local or on a shared "
                   "file system; required")
    p.add_argument("--reference", help="ADM reference .npz (or anything `python -m evaluation` takes as "
                   "--reference); required")
    add_run_flags(p)
    g = p.add_argument_group("what to evaluate and when to stop")
    g.add_argument("--once", action="store_true", help="evaluate what exists now, then exit (default: poll)")
    g.add_argument("--latest", action="store_true", help="evaluate only the newest export, then exit (e.g. a finished run)")
    g.add_argument("--until", type=nonneg_int, metavar="STEP", help="stop once a step >= STEP is evaluated "
                   "(default: stop at RUN/DONE)")
    g.add_argument("--poll", type=positive_float, default=d.poll, help="seconds between looks (default %(default)s)")
    g = p.add_argument_group("sampling (python -m trainer sample)")
    g.add_argument("--num-samples", type=positive_int, default=d.num_samples, help="images per checkpoint "
                   "(default %(default)s; the paper's numbers use 50000)")
    flag(g, "--num-steps", "--steps", dest="num_steps", metavar="N", type=positive_int, default=d.num_steps,
         help="SDE sampler steps (default %(default)s)")
    g.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="(default %(default)s: no guidance, "
                   "as in the paper's FID-over-training figures)")
    g.add_argument("--guidance-high", type=float, default=d.guidance_high, help="(default %(default)s)")
    g.add_argument("--seed", type=nonneg_int, default=d.seed, help="(default %(default)s)")
    flag(g, "--num-gpus", "--nproc", dest="num_gpus", metavar="N", type=positive_int, default=d.num_gpus,
         help="sampling processes via torchrun, one per GPU (default %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="global sampling batch, split "
                   f"across the --num-gpus processes as `trainer sample` does (default: {BATCH_PER_GPU} per GPU)")
    flag(g, "--precision", "--sample-precision", dest="precision", choices=SAMPLE_PRECISIONS, default=d.precision,
         help="the sampler's numerics, as `trainer sample --precision`; the metrics always run in fp32 "
              "(default %(default)s)")
    g.add_argument("--prompts", metavar="FILE", help="text-to-image runs: trainer sample --prompts (one per line)")
    g.add_argument("--captions", metavar="ANNOTATIONS.json|MANIFEST", help="text-to-image runs: trainer sample "
                   "--captions (default for a text run: --reference, when it is a features manifest with captions)")
    g = p.add_argument_group("metrics (python -m evaluation)")
    g.add_argument("--clip-model", metavar="NAME[=PATH]", help="text-to-image runs: add the CLIP score, as for "
                   "python -m evaluation")
    g.add_argument("--inception-weights", metavar="PATH|random:SEED", help="as for python -m evaluation "
                   "(default: torch-fidelity's cached download)")
    g.add_argument("--metrics", metavar="LIST", type=metric_list, help="as for python -m evaluation: e.g. fid,fd_dinov2 (default: "
                   "its default, which adds fd_dinov2 when the DINOv2 weights are downloaded)")
    g.add_argument("--dinov2", metavar="NAME[=PATH]", help="as for python -m evaluation (default: dinov2-vit-l)")
    g.add_argument("--resize", choices=("torch", "pil"), help="as for python -m evaluation (default: torch)")
    g.add_argument("--eval-batch-size", type=positive_int, default=d.eval_batch_size, help="the metrics job's "
                   "--batch-size (global: one process) (default %(default)s)")
    g.add_argument("--device", type=device_flag, default=d.device, help=f"of the metrics job: {DEVICE_HELP} "
                   "(default %(default)s)")
    g.add_argument("--report-to", choices=("tensorboard", "wandb", "none"), help="tracker (default: the run's "
                   "--report-to)")
    g.add_argument("--cache-dir", help="HDF5 activation cache (default: python -m evaluation's)")
    g.add_argument("--keep-samples", action="store_true", help="keep RUN/eval/work/STEP/samples after its row")
    return p


def resolve(argv: Sequence[str]) -> tuple[WatchConfig, bool]:
    """argv -> (settings, dry_run); defaults < --config file < flags. The paths are checked when it runs."""
    values, dry = config_values(build_parser(), argv, WatchConfig)
    check(bool(values.get("run")), "python -m evaluation watch: RUN is required (or 'run' in --config)")
    check(bool(values.get("reference")), "python -m evaluation watch: --reference is required "
                                         "(or 'reference' in --config)")
    cfg = WatchConfig(**values)
    if cfg.batch_size is None:
        cfg.batch_size = BATCH_PER_GPU * cfg.num_gpus
    check(cfg.cfg_scale >= 1.0, f"--cfg-scale must be >= 1 (1 = no guidance), got {cfg.cfg_scale}")
    return cfg, dry


def check_paths(cfg: WatchConfig) -> WatchConfig:
    """A watch that is about to run: its run folder and reference must exist."""
    check(Path(cfg.run).is_dir(), f"run folder not found: {cfg.run}")
    check(Path(cfg.reference).exists(), f"--reference not found: {cfg.reference}")
    if run_config(Path(cfg.run)).get("context") and not (cfg.prompts or cfg.captions):
        ref = Path(cfg.reference)
        check(ref.is_dir() and (ref / "manifest.json").is_file(),
              f"{cfg.run} is a text-to-image run: give --prompts FILE or --captions ANNOTATIONS.json (or a "
              f"captioned features manifest as --reference)")
        cfg.captions = str(ref)  # one caption per reference image, drawn by (seed, image)
    return cfg


def parse(argv: Sequence[str]) -> WatchConfig:
    return check_paths(resolve(argv)[0])


# ---- the run folder ---------------------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Rewrite metrics.jsonl with one more row, atomically: a kill leaves the old file or the new one."""
    rows = read_rows(path) + [row]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """One watcher per run: an advisory lock the OS releases when the process dies."""
    f = open(folder / "watch.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"another watcher is already running on {folder.parent} ({folder / 'watch.lock'})") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def snapshot(export: Path, work: Path) -> Path | None:
    """Link (or copy) the export and its config.json into work/, so retention can't delete it mid-evaluation."""
    dst = work / "ema.safetensors"
    if dst.is_file():
        return dst
    work.mkdir(parents=True, exist_ok=True)
    try:
        conf = work / "config.json"
        if not conf.is_file():
            shutil.copyfile(export.parent / "config.json", work / ".config.json.tmp")
            os.replace(work / ".config.json.tmp", conf)
        try:
            os.link(export, work / ".ema.tmp")
        except OSError:  # another file system, or no hard links: copy
            shutil.copyfile(export, work / ".ema.tmp")
        os.replace(work / ".ema.tmp", dst)
    except FileNotFoundError:
        return None  # pruned by the trainer's retention before we got to it
    return dst


# ---- one evaluation ---------------------------------------------------------------------------------------------

def sample_command(cfg: WatchConfig, ckpt: Path, out: Path) -> list[str]:
    """`trainer sample` as a subprocess (the evaluation stage does not import the trainer)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(cfg.num_gpus)] if cfg.num_gpus > 1 else [sys.executable]
    return [*launcher, "-m", "trainer", "sample", "--ckpt", str(ckpt), "--out", str(out),
            "--num-samples", str(cfg.num_samples), "--num-steps", str(cfg.num_steps),  # the family's default mode
            "--cfg-scale", str(cfg.cfg_scale), "--guidance-high", str(cfg.guidance_high), "--seed", str(cfg.seed),
            "--batch-size", str(cfg.batch_size), "--precision", cfg.precision,  # both global
            *(["--prompts", cfg.prompts] if cfg.prompts else []), *(["--captions", cfg.captions] if cfg.captions else [])]


def evaluate(cfg: WatchConfig, step: int, export: Path, log) -> dict[str, Any] | None:
    """Sample and score one export; returns its row, or None if the export was pruned before we could start."""
    run = Path(cfg.run)
    work = run / "eval" / "work" / f"{step:07d}"
    ckpt = snapshot(export, work)
    if ckpt is None:
        log(f"step {step}: export {export.name} was pruned before it could be evaluated; skipped")
        return None
    t0 = time.perf_counter()
    cmd = sample_command(cfg, ckpt, work / "samples")
    log(f"step {step}: sampling {cfg.num_samples} images ({cfg.num_steps} steps of the model's default sampler, "
        f"cfg {cfg.cfg_scale})")
    rc = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if rc != 0:
        raise UserError(f"step {step}: sampling failed (exit {rc}): {' '.join(cmd)}")
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    from evaluation.job import main as metrics_main
    report_path = work / "report.json"
    metrics_main(metrics_command(cfg, work / "samples", report_path))
    report = read_json(report_path, "evaluation report")
    t_eval = time.perf_counter() - t0
    scores = {k: report["metrics"].get(k) for k in METRICS
              if k not in ("fd_dinov2", "clip_score") or k in report["metrics"]}
    return {"step": step, **scores, "num_samples": cfg.num_samples,
            "sampler": {"mode": sampled_mode(work / "samples"), "steps": cfg.num_steps, "cfg_scale": cfg.cfg_scale,
                        "guidance_high": cfg.guidance_high, "seed": cfg.seed},
            "comparable": report.get("comparable"), "export": export.name, "sample_s": round(t_sample, 2),
            "eval_s": round(t_eval, 2), "time": time.time()}


def sampled_mode(samples: Path) -> str | None:
    """The sampler `trainer sample` chose (the model family's default: SiT sde, DiT ddpm), from its manifest."""
    with contextlib.suppress(UserError, KeyError, TypeError):
        return read_json(samples / "manifest.json", "samples manifest")["repa"]["sampler"]["mode"]
    return None


def metrics_command(cfg: WatchConfig, samples: Path, report: Path) -> list[str]:
    """The metrics job's argv for one export's samples."""
    args = ["--samples", str(samples), "--reference", cfg.reference, "--out", str(report),
            "--batch-size", str(cfg.eval_batch_size), "--device", cfg.device, "--num-samples", str(cfg.num_samples)]
    for name in ("inception_weights", "cache_dir", "metrics", "dinov2", "resize", "clip_model"):
        v = getattr(cfg, name)
        if v:
            args += ["--" + name.replace("_", "-"), ",".join(v) if isinstance(v, list) else str(v)]
    return args


def run_config(run: Path) -> dict[str, Any]:
    p = run / "config.json"
    return read_json(p, "run config") if p.is_file() else {}


def fid_figure(rows: list[dict[str, Any]]):
    """FID (and sFID) against training step on a log axis, with IS and precision/recall beside it, and FD_DINOv2
    in a fourth panel when the rows have it (its values run far above FID's)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator
    panels = [(("fid", "sfid"), "FID / sFID (lower is better)", "distance", True),
              (("is",), "Inception Score (higher is better)", "IS", False),
              (("precision", "recall"), "precision / recall (k=3)", "fraction", False)]
    if any(isinstance(r.get("fd_dinov2"), (int, float)) for r in rows):
        panels.append((("fd_dinov2",), "FD_DINOv2 (lower is better)", "distance", True))
    fig = Figure(figsize=(11 * len(panels) / 3, 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels))
    steps = [r["step"] for r in rows]
    n = rows[-1].get("num_samples") if rows else None
    for ax, (keys, title, unit, log) in zip(axes, panels):
        for k in keys:
            pts = [(s, r[k]) for s, r in zip(steps, rows) if isinstance(r.get(k), (int, float)) and
                   (r[k] > 0 or not log)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log and ax.lines:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))  # 1.97, not 1.97x10^0
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        if len(keys) > 1 and ax.lines:
            ax.legend(frameon=False)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)
    comparable = all(r.get("comparable", True) for r in rows)
    fig.suptitle(f"EMA model over training ({n} samples per point)" +
                 ("" if comparable else "\nrandom Inception weights: not comparable to published numbers"))
    return fig


def draw_fid_png(rows: list[dict[str, Any]], path: Path) -> None:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = fid_figure(rows)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def pending(cfg: WatchConfig, done_step: int) -> list[tuple[int, Path]]:
    """Exports after the last evaluated step (rows stay in step order), up to --until; only the newest with --latest."""
    todo = [(s, p) for s, p in list_exports(cfg.run) if s > done_step and (cfg.until is None or s <= cfg.until)]
    return todo[-1:] if cfg.latest else todo


def watch(cfg: WatchConfig) -> int:
    run = Path(cfg.run)
    out = run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"

    def log(text: str) -> None:
        print(f"[watch] {text}", file=sys.stderr, flush=True)

    with exclusive(out):
        rows = read_rows(metrics_path)
        last = max((r["step"] for r in rows), default=-1)
        kind = cfg.report_to or run_config(run).get("train", {}).get("report_to", "tensorboard")
        # The purge drops tracker points of an evaluation that was killed before its row was written.
        tracker = open_tracker(kind, run / EVAL_TB_DIR, purge_step=last + 1, name=f"{run.name}-eval")
        try:
            while True:
                for step, export in pending(cfg, last):
                    row = evaluate(cfg, step, export, log)
                    if row is None:
                        continue
                    tracker.scalars(step, {k: row[k] for k in METRICS if row.get(k) is not None}, prefix="eval/")
                    tracker.flush()
                    append_row(metrics_path, row)  # the commit point: from here on the step counts as done
                    rows.append(row)
                    last = step
                    draw_fid_png(rows, out / "fid.png")
                    if not cfg.keep_samples:
                        shutil.rmtree(out / "work" / f"{step:07d}", ignore_errors=True)
                    log(f"step {step}: " + ", ".join(f"{k} {row[k]:.4g}" for k in METRICS
                                                     if isinstance(row.get(k), (int, float))))
                if cfg.once or cfg.latest:
                    break
                if cfg.until is not None and last >= cfg.until:
                    log(f"reached --until {cfg.until}")
                    break
                if (run / DONE_MARKER).exists() and not pending(cfg, last):
                    log(f"the run is finished ({DONE_MARKER}); all exports evaluated")
                    break
                time.sleep(cfg.poll)
        finally:
            tracker.close()
    if rows:
        print(json.dumps({"metrics": str(metrics_path), "plot": str(out / "fid.png"), "rows": len(rows),
                          "last": rows[-1]}))
    else:
        log(f"no EMA exports to evaluate in {run / 'export'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, dry = resolve(argv)
    return print_config(cfg) if dry else watch(check_paths(cfg))
