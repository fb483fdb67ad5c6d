"""GPU benchmark of the real training loop: `python -m trainer train` (in this process), SiT-XL/2 + REPA
(DINOv2-B targets, 768-d), global batch 256, fp16, on a features manifest of synthetic data written here.

It reports img/s (steady-state stats.jsonl intervals, compile excluded), MFU, peak memory after step 1, the
micro-batch `--micro-batch auto` chose, and the device-to-host syncs per step, counted with
torch.cuda.set_sync_debug_mode("warn") between consecutive steps (one warning per synchronizing call).

MFU = img/s x training FLOPs per image / 989 TFLOP/s (H100 SXM dense fp16/bf16). Training FLOPs per image =
3 x forward (backward = 2 x forward); forward = 2 x MACs; SiT-XL/2 at 256 px is 118.6 G MACs per forward (DiT
Table 4, DESIGN §7; the REPA projector's ~1.3 G MACs are left out), so 711.6 GFLOP per image.

    python tests/benchmarks/gpu_trainer.py [--steps 25] [--json out.json]     # one GPU
    python tests/benchmarks/gpu_trainer.py --device cpu --tiny                 # the same loop, SiT-Debug/2 on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

H100_PEAK = 989e12  # H100 SXM dense bf16/fp16 tensor-core peak, FLOP/s (NVIDIA datasheet)
XL2_FWD_MACS = 118.6e9  # SiT-XL/2 = DiT-XL/2 forward at 256 px, multiply-accumulates (DESIGN §7)
TRAIN_FLOPS_PER_IMAGE = 3 * 2 * XL2_FWD_MACS
FORMULA = "MFU = img/s x 3 x (2 x 118.6e9) FLOP / 989e12 FLOP/s"
PAPER_IMG_S = 170  # paper: 5.4 it/s at batch 256 on 8xH100 with online DINOv2 (DESIGN §7)


class SyncCounter:
    """Counts synchronizing CUDA calls between consecutive optimiser steps of the real loop."""

    def __init__(self):
        self.warnings: list[warnings.WarningMessage] = []
        self.marks: list[int] = []  # len(self.warnings) at each step's end

    def hook(self):
        from trainer.loop import health
        orig = health.Health.record
        counter = self

        def record(self_, *a, **k):
            orig(self_, *a, **k)
            counter.marks.append(len(counter.warnings))
            if len(counter.marks) == 2 and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()  # peak memory of the steady state (after the probe, step 1)
        health.Health.record = record

    def per_step(self, skip: int) -> tuple[float | None, dict[str, int]]:
        """Median syncs per step after `skip` steps, and where the steady-state ones came from."""
        m = self.marks[skip:]
        if len(m) < 2:
            return None, {}
        counts = sorted(b - a for a, b in zip(m, m[1:]))
        where: dict[str, int] = {}
        for w in self.warnings[m[0]:m[-1]]:
            k = f"{Path(w.filename).name}:{w.lineno}"
            where[k] = where.get(k, 0) + 1
        return float(counts[len(counts) // 2]), where


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="SiT-Debug/2, batch 4, 3 steps (CPU logic check)")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default 25; 3 with --tiny)")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_trainer: skipped: no CUDA (use --device cpu --tiny)")
        return 0
    from helpers import make_features_manifest

    from trainer.loop.train import main as train_main
    steps = a.steps or (3 if a.tiny else 25)
    log_every = 1 if a.tiny else 5
    model, batch, num = ("SiT-Debug/2", 4, 16) if a.tiny else ("SiT-XL/2", 256, 512)
    counter = SyncCounter()
    counter.hook()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_features_manifest(Path(tmp) / "feat", num=num, classes=1000 if not a.tiny else 4, shard_size=256,
                               encoders={"dinov2-vit-b": 768})
        t_data = time.perf_counter() - t0
        argv = ["--manifest", f"{tmp}/feat", "--run-dir", f"{tmp}/run", "--model", model, "--batch-size", str(batch),
                "--steps", str(steps), "--ckpt-every", str(10 ** 9), "--log-every", str(log_every),
                "--num-workers", "1" if a.tiny else "8", "--precision", "fp32" if a.device == "cpu" else "fp16"]
        if a.tiny:
            argv += ["--enc-depth", "2"]
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counter.warnings = caught
            if a.device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                rc = train_main(argv)
            finally:
                if a.device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        wall = time.perf_counter() - t0
        if rc != 0:
            print(f"trainer exited {rc}")
            return 1
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "stats.jsonl").read_text().splitlines()]
        run_cfg = json.loads((Path(tmp) / "run" / "config.json").read_text())
    steady = rows[1:] if len(rows) > 1 else rows  # the first interval holds torch.compile and warm-up
    img_s = sum(r["img_per_s"] for r in steady) / len(steady)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if a.device == "cuda" else None
    syncs, where = counter.per_step(skip=log_every + 1) if a.device == "cuda" else (None, {})
    res = {"bench": "gpu_trainer", "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
           "model": model, "global_batch": batch, "steps": steps, "precision": "fp16" if a.device == "cuda" else "fp32",
           "img_per_s": img_s, "mfu": img_s * TRAIN_FLOPS_PER_IMAGE / H100_PEAK if not a.tiny else None,
           "mfu_formula": FORMULA, "peak_gib": peak, "micro_batch": run_cfg.get("resolved", {}).get("micro_batch"),
           "host_syncs_per_step": syncs, "sync_sites": where, "loss_last": rows[-1]["loss"],
           "data_write_s": round(t_data, 1), "train_wall_s": round(wall, 1),
           "intervals_img_per_s": [r["img_per_s"] for r in rows]}
    print(f"{model} + REPA, global batch {batch}, {res['precision']}, real `trainer train` loop on {res['device']}")
    print(f"  {img_s:.1f} img/s (steady intervals), micro-batch {res['micro_batch']}, "
          f"peak {peak if peak is None else round(peak, 1)} GiB, host syncs/step {syncs} {where or ''}")
    if res["mfu"] is not None:
        print(f"  MFU {res['mfu']:.1%} ({FORMULA}); x{img_s / PAPER_IMG_S:.2f} the paper's ~{PAPER_IMG_S} img/s/GPU")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    sys.exit(main())
