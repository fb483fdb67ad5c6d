"""The whole REPA chain on CPU in minutes: synth -> extract -> train -> sample -> evaluate -> align -> watch.

The analytic `pixel-vae` (area-downsampling and a fixed colour transform, no weights) stands in for the SD VAE,
so the SiT's samples are pictures a person can judge: RUN/samples/step-*.png shows the same classes and noise
sharpening into each class's shape, colour and place over training. The encoders are tiny and random-init,
so the REPA term aligns to noise, and the metrics use random Inception weights: both mean nothing.
`DEMO_FAST=1` shrinks every step so the test suite can run the same chain.
`--t2i` runs the text-to-image chain instead: the same images with their captions ("a red circle at the top left"),
caption contexts from a tiny random CLIP text encoder, MMDiT-Debug/2 + REPA, samples from a prompt file, FID and
CLIP score (random weights: meaningless); RUN/samples/step-*.png has one cell per prompt in RUN/samples/prompts.txt.
`--store s3` (or DEMO_STORE=s3) starts a local S3 server (moto, needs `pip install '.[s3]'`) and keeps the
dataset, features, run, samples and report in a bucket, so every stage reads and writes s3:// URLs.
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
    sample_every: int
    num_samples: int
    sample_steps: int
    align_images: int
    watch_samples: int
    grid_steps: int  # SDE steps of the training grids and the watcher's samples


RESOLUTION = 128  # a 16x16 latent: 64 tokens for SiT-Debug/2 and an 8x8 grid for the tiny encoders
FULL = DemoSize(classes=8, per_class=24, steps=600, batch_size=16, ckpt_every=200, log_every=10, sample_every=100,
                num_samples=64, sample_steps=50, align_images=64, watch_samples=64, grid_steps=32)
FAST = DemoSize(classes=4, per_class=6, steps=30, batch_size=8, ckpt_every=15, log_every=5, sample_every=15,
                num_samples=16, sample_steps=10, align_images=24, watch_samples=8, grid_steps=8)


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
    ap.add_argument("--t2i", action="store_true", default=os.environ.get("DEMO_T2I") == "1",
                    help="the text-to-image chain (captions, tiny CLIP text encoder, MMDiT-Debug/2) (also DEMO_T2I=1)")
    ap.add_argument("--store", choices=("local", "s3"), default=os.environ.get("DEMO_STORE", "local"),
                    help="where the chain keeps its data: local folders, or a bucket on a local S3 server "
                         "(also DEMO_STORE=s3)")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # manifests.storage for s3:// summaries
    size = FAST if a.fast else FULL
    out = Path(a.out).resolve()
    data, feats, run_dir = out / "data", out / "features", out / "run"
    samples, report, align = out / "samples", out / "report.json", out / "align"
    server = None
    if a.t2i:
        return t2i_chain(size, out)
    if a.store == "s3":
        server, bucket = start_s3(out)
        data_src, feats_u, run_u = f"{bucket}/data", f"{bucket}/features", f"{bucket}/run"
        samples_u, report_u = f"{bucket}/samples", f"{bucket}/report.json"
    else:
        data_src, feats_u, run_u, samples_u, report_u = (str(data), str(feats), str(run_dir),
                                                         str(samples), str(report))
    try:
        return chain(a, size, out, data, data_src, feats_u, run_u, samples_u, report_u, align)
    finally:
        if server is not None:
            server.stop()


def start_s3(out: Path):
    """A moto S3 server on 127.0.0.1 (free port) with a fresh bucket; AWS_* variables point every stage at it."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Dummy keys for the local server only; the stages find it through the standard AWS variables.
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="demo",
                      AWS_SECRET_ACCESS_KEY="demo", AWS_DEFAULT_REGION="us-east-1",
                      REPA_REMOTE_CACHE=str(out / "remote-cache"))
    from manifests import storage
    storage.filesystem("s3").mkdir("repa-demo")
    print(f"S3 store: moto server at http://127.0.0.1:{port}, bucket s3://repa-demo", flush=True)
    return server, "s3://repa-demo"


def upload_folder(local: Path, url: str) -> None:
    from manifests import storage
    for p in sorted(local.rglob("*")):
        if p.is_file():
            (storage.path(url) / p.relative_to(local).as_posix()).upload(p)


def chain(a, size: DemoSize, out: Path, data: Path, data_src: str, feats: str, run_dir: str, samples: str,
          report: str, align: Path) -> int:
    from manifests import storage
    local = a.store == "local"
    encoders = "tiny-dinov2,tiny-siglip"
    print("REPA demo on CPU: the analytic pixel-vae lets you watch the SiT learn (RUN/samples/step-*.png);\n"
          "the encoders are tiny RANDOM-INIT ones, so alignment and metrics are meaningless by design.\n"
          f"For real ones use pretrained weights: {REAL_FLAGS} (hub cache or NAME=PATH); see docs/reproducing.md.")
    t_start, log = time.time(), []
    run("1/7 synthesise the embedded dataset",
        ["pipeline", "synth", "--out", str(data), "--classes", str(size.classes), "--per-class", str(size.per_class)],
        log)
    if not local:
        upload_folder(data, data_src)  # the ImageFolder now lives under a bucket prefix
    run("2/7 extract latents (analytic pixel-vae) + encoder features (local Ray)",
        ["pipeline", "extract", "--source", data_src, "--out", feats, "--vae", "pixel-vae",
         "--resolution", str(RESOLUTION), "--encoders", encoders, "--shard-size", "64", "--micro-batch", "16"], log)
    run("3/7 train SiT-Debug/2 with REPA (sample grids in run/samples/, TensorBoard in run/tb/)",
        ["trainer", "train", "--manifest", feats, "--run-dir", run_dir,
         "--model", "SiT-Debug/2", "--encoders", encoders, "--encoder-depth", "2", "--train-steps", str(size.steps),
         "--batch-size", str(size.batch_size), "--ckpt-every", str(size.ckpt_every),
         "--log-every", str(size.log_every), "--precision", "fp32", "--num-workers", "0",
         # a short CPU run: a larger step than the paper's 1e-4, and an EMA that forgets within ~50 steps
         # (0.9999 would still be ~94% the initial weights after 600 steps)
         "--lr", "1e-3", "--ema-decay", "0.98", "--sample-every", str(size.sample_every),
         "--sample-num-samples", str(2 * size.classes), "--sample-num-steps", str(size.grid_steps)], log)
    ckpt = run_dir  # the run folder: its newest EMA export
    run("4/7 sample (SDE, CFG interval)",
        ["trainer", "sample", "--ckpt", ckpt, "--out", samples, "--num-samples", str(size.num_samples),
         "--num-steps", str(size.sample_steps), "--cfg-scale", "1.8", "--guidance-high", "0.7", "--batch-size", "16",
         "--precision", "fp32"], log)
    run("5/7 evaluate (random Inception and DINOv2 weights: NOT comparable to published numbers)",
        ["evaluation", "--samples", samples, "--reference", data_src, "--out", report,
         "--inception-weights", "random:0", "--metrics", "fid,sfid,is,pr,fd_dinov2", "--dinov2", "tiny-dinov2",
         "--batch-size", "16"], log)
    run("6/7 alignment analysis (CKNNA + linear probe per layer)",
        ["evaluation", "align", "--ckpt", ckpt, "--manifest", feats,
         "--num-samples", str(size.align_images), "--out", str(align), "--epochs", "20"], log)
    if local:  # the watcher follows a run folder on a file system (shared between machines, or this one)
        run("7/7 FID watcher, once, on the final EMA export (random Inception: meaningless numbers)",
            ["evaluation", "watch", run_dir, "--reference", data_src, "--latest", "--num-samples",
             str(size.watch_samples), "--num-steps", str(size.grid_steps), "--batch-size", "16",
             "--inception-weights", "random:0", "--metrics", "fid,sfid,is,pr", "--eval-batch-size", "16"], log)
    print(f"\n=== demo finished in {time.time() - t_start:.0f}s")
    for step, secs in log:
        print(f"  {secs:6.1f}s  {step}")
    try:
        metrics = json.loads(storage.path(report).read_text()).get("metrics", {})
        print("  metrics (random Inception and DINOv2, meaningless): " + json.dumps(metrics))
    except Exception:  # noqa: BLE001 - a summary line only
        pass
    run_p = storage.path(run_dir)
    grids = sorted(run_p.glob("samples/step-*.png")) if local else []
    print("\nWhere everything is:")
    for what, p in [("dataset", storage.path(data_src)), ("features manifest", storage.path(feats) / "manifest.json"),
                    ("training log", run_p / "log.txt"), ("loss curve", run_p / "loss.png"),
                    ("grids (first)", grids[0] if grids else run_p / "samples"),
                    ("grids (last)", grids[-1] if grids else run_p / "samples"),
                    ("TensorBoard", run_p / "tb"), ("checkpoints", run_p / "checkpoints"),
                    ("samples manifest", storage.path(samples) / "manifest.json"),
                    ("sample grid", storage.path(samples) / "grid.png"), ("evaluation report", storage.path(report)),
                    ("alignment", align / "alignment.png")] + (
                       [("FID over training", run_p / "eval" / "fid.png")] if local else []):
        print(f"  {what:18s} {p}{'' if p.exists() else '   (missing!)'}")
    print(f"\nWatch the grids sharpen: {len(grids)} grids in {run_p / 'samples'} (one column per class, the same "
          f"noise in each), or: tensorboard --logdir {run_p / 'tb'}\n"
          "The encoders are tiny and random, so alignment and metrics are meaningless here.\n"
          f"Real runs: python -m pipeline extract ... {REAL_FLAGS}  (docs/reproducing.md)")
    return 0


def t2i_chain(size: DemoSize, out: Path) -> int:
    """synth (with COCO-layout captions) -> extract with contexts -> train MMDiT -> sample from prompts -> evaluate."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.synth import captions_for
    data, feats, run_dir, samples = out / "data", out / "features", out / "run", out / "samples"
    print("REPA text-to-image demo on CPU: captions -> tiny RANDOM CLIP text contexts -> MMDiT-Debug/2 + REPA.\n"
          "Grids (run/samples/step-*.png, prompts in run/samples/prompts.txt) show colour, shape and place "
          "following the words;\nthe encoders and metrics use random weights, so their numbers mean nothing.")
    t_start, log = time.time(), []
    run("1/5 synthesise the embedded dataset and its captions (MS-COCO layout: data/captions.json)",
        ["pipeline", "synth", "--out", str(data), "--classes", str(size.classes), "--per-class", str(size.per_class)],
        log)
    run("2/5 extract latents, DINOv2 tokens and caption contexts (U-ViT crop, int8 contexts)",
        ["pipeline", "extract", "--source", str(data), "--captions", str(data / "captions.json"), "--out", str(feats),
         "--vae", "pixel-vae", "--resolution", str(RESOLUTION), "--encoders", "tiny-dinov2", "--text-encoder",
         "tiny-clip-text", "--shard-size", "64", "--micro-batch", "16"], log)
    run("3/5 train MMDiT-Debug/2 with REPA (grids for fixed prompts in run/samples/)",
        ["trainer", "train", "--manifest", str(feats), "--run-dir", str(run_dir), "--model", "MMDiT-Debug/2",
         "--encoders", "tiny-dinov2", "--encoder-depth", "2", "--train-steps", str(size.steps),
         "--batch-size", str(size.batch_size), "--ckpt-every", str(size.ckpt_every), "--log-every",
         str(size.log_every), "--precision", "fp32", "--num-workers", "0", "--lr", "1e-3", "--ema-decay", "0.98",
         "--sample-every", str(size.sample_every), "--sample-num-samples", str(2 * size.classes),
         "--sample-num-steps", str(size.grid_steps)], log)
    prompts = out / "prompts.txt"  # one prompt per class: its first caption
    prompts.write_text("".join(captions_for(c, size.classes, gray=False)[0] + "\n" for c in range(size.classes)))
    run("4/5 sample from a prompt file (ODE, CFG 2 on the empty context; two seeds per prompt)",
        ["trainer", "sample", "--ckpt", str(run_dir), "--out", str(samples), "--prompts", str(prompts),
         "--num-samples", str(2 * size.classes), "--mode", "ode", "--num-steps", str(size.sample_steps),
         "--cfg-scale", "2", "--batch-size", "16", "--precision", "fp32"], log)
    run("5/5 evaluate: FID against the features' images (U-ViT crop) and CLIP score (random weights: meaningless)",
        ["evaluation", "--samples", str(samples), "--reference", str(feats), "--out", str(out / "report.json"),
         "--inception-weights", "random:0", "--metrics", "fid", "--clip-model", "tiny-clip", "--batch-size", "16"],
        log)
    print(f"\n=== text-to-image demo finished in {time.time() - t_start:.0f}s")
    for step, secs in log:
        print(f"  {secs:6.1f}s  {step}")
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    print(f"\n  prompts      {run_dir / 'samples' / 'prompts.txt'}\n  grids        {len(grids)} in "
          f"{run_dir / 'samples'}\n  samples grid {samples / 'grid.png'} (prompts: {prompts})\n"
          f"  report       {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
