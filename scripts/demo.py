"""The whole REPA chain on CPU in minutes: synth -> extract -> train -> sample -> evaluate -> align.

Tiny random-init encoders and VAE give meaningless pictures: this shows the machinery, not the quality.
`DEMO_FAST=1` shrinks every step so the test suite can run the same chain.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REAL_FLAGS = "--vae sd-vae-ft-ema --encoders dinov2-vit-b"


@dataclass(frozen=True)
class DemoSize:
    """How big each step of the chain is."""
    classes: int
    per_class: int
    steps: int
    batch_size: int
    ckpt_every: int
    log_every: int
    num_samples: int
    sample_steps: int
    align_images: int


FULL = DemoSize(classes=10, per_class=20, steps=300, batch_size=16, ckpt_every=100, log_every=10, num_samples=64,
                sample_steps=50, align_images=64)
FAST = DemoSize(classes=4, per_class=6, steps=30, batch_size=8, ckpt_every=15, log_every=5, num_samples=16,
                sample_steps=10, align_images=24)


def run(step: str, args: list[str], log: list[tuple[str, float]]) -> None:
    print(f"\n=== {step}\n$ python -m {shlex.join(args)}", flush=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    rc = subprocess.call([sys.executable, "-m", *args], env=env)
    log.append((step, time.time() - t0))
    if rc != 0:
        print(f"\ndemo: step '{step}' failed with exit code {rc}", file=sys.stderr)
        sys.exit(rc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python scripts/demo.py --out demo   (or: make demo)")
    ap.add_argument("--out", default="demo", help="folder for every artefact of the chain (default: demo)")
    ap.add_argument("--fast", action="store_true", default=os.environ.get("DEMO_FAST") == "1",
                    help="tiny sizes, for the test suite (also DEMO_FAST=1)")
    a = ap.parse_args()
    size = FAST if a.fast else FULL
    out = Path(a.out).resolve()
    data, feats, run_dir = out / "data", out / "features", out / "run"
    samples, report, align = out / "samples", out / "report.json", out / "align"
    encoders = "tiny-dinov2,tiny-siglip"
    print("REPA demo on CPU with tiny RANDOM-INIT VAE and encoders: the pictures are meaningless by design.\n"
          f"For real ones use pretrained weights: {REAL_FLAGS} (hub cache or NAME=PATH); see README.")
    t_start, log = time.time(), []
    run("1/6 synthesise the embedded dataset",
        ["pipeline", "synth", "--out", str(data), "--classes", str(size.classes), "--per-class", str(size.per_class)],
        log)
    run("2/6 extract latents + encoder features (local Ray)",
        ["pipeline", "extract", "--source", str(data), "--out", str(feats), "--vae", "tiny-vae",
         "--encoders", encoders, "--shard-size", "64", "--batch-size", "16"], log)
    run("3/6 train SiT-Debug/2 with REPA",
        ["trainer", "train", "--manifest", str(feats / "manifest.json"), "--run-dir", str(run_dir),
         "--model", "SiT-Debug/2", "--encoders", encoders, "--enc-depth", "2", "--steps", str(size.steps),
         "--batch-size", str(size.batch_size), "--ckpt-every", str(size.ckpt_every),
         "--log-every", str(size.log_every), "--precision", "fp32", "--num-workers", "0",
         # a short run: EMA 0.9999 would still be ~97% the initial weights after 300 steps
         "--ema-decay", "0.99"], log)
    ckpt = sorted((run_dir / "checkpoints").glob("*.pt"))[-1]
    run("4/6 sample (SDE, CFG interval)",
        ["trainer", "sample", "--ckpt", str(ckpt), "--out", str(samples), "--num-samples", str(size.num_samples),
         "--steps", str(size.sample_steps), "--cfg-scale", "1.8", "--guidance-high", "0.7", "--batch-size", "16",
         "--precision", "fp32"], log)
    run("5/6 evaluate (random Inception weights: NOT comparable to published numbers)",
        ["evaluation", "--samples", str(samples), "--reference", str(data), "--out", str(report),
         "--inception-weights", "random:0", "--batch-size", "16"], log)
    run("6/6 alignment analysis (CKNNA + linear probe per layer)",
        ["evaluation", "align", "--ckpt", str(ckpt), "--manifest", str(feats / "manifest.json"),
         "--num-images", str(size.align_images), "--out", str(align), "--epochs", "20"], log)
    print(f"\n=== demo finished in {time.time() - t_start:.0f}s")
    for step, secs in log:
        print(f"  {secs:6.1f}s  {step}")
    try:
        metrics = json.loads(report.read_text()).get("metrics", {})
        print("  metrics (random Inception, meaningless): " + json.dumps(metrics))
    except (OSError, ValueError):
        pass
    print("\nWhere everything is:")
    for what, p in [("dataset", data), ("features manifest", feats / "manifest.json"),
                    ("loss curve", run_dir / "loss.png"), ("checkpoints", run_dir / "checkpoints"),
                    ("samples manifest", samples / "manifest.json"), ("sample grid", samples / "grid.png"),
                    ("evaluation report", report), ("alignment", align / "alignment.png")]:
        print(f"  {what:18s} {p}{'' if p.exists() else '   (missing!)'}")
    print("\nThese pictures come from tiny random encoders and a VAE that was never trained: meaningless.\n"
          f"Real runs: python -m pipeline extract ... {REAL_FLAGS}  (README: Reproducing the paper)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
