"""Demo-size training on float16 vs int8 tokens of the same images, same seed: do the loss curves differ?

    python tests/benchmarks/codec_curves.py --out /tmp/codec-curves [--steps 300]

synth (10 classes x 20) -> one extract in float16 (in-process, no Ray) -> `pipeline convert` to int8 (the tokens
of both sets come from the same encoder outputs) -> `trainer train` SiT-Debug/2 with tiny-dinov2 + tiny-siglip on
each, seed 0, logging every step. Prints the mean and largest per-step difference of the denoising and REPA losses between the
two runs, against the step-to-step noise of the float16 run (std of its first differences), and draws
OUT/codec_curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ENCODERS = "tiny-dinov2,tiny-siglip"


def sh(*args: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    print("$ python -m " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args], check=True, env=env)


def extract_inprocess(data: Path, out: Path) -> None:
    """`pipeline extract --feature-dtype float16` with the tiny presets, run in this process (no Ray: a loaded
    2-core machine can time out starting Ray). Same decode task, encoder actor and exactly-once writer."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pipeline.job import ExtractConfig, content_settings
    from pipeline.sources import list_source
    from pipeline.worker import ShardEncoder, decode_shard
    from pipeline.writer import assemble_manifest, fingerprint, plan_shards, shard_done
    cfg = ExtractConfig(source=str(data), out=str(out), vae="tiny-vae", encoders=ENCODERS.split(","),
                        shard_size=64, batch_size=16, feature_dtype="float16")
    listing = list_source(cfg.source)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    plans = plan_shards(listing.items, cfg.shard_size)
    fp = fingerprint(content_settings(cfg), listing.items)
    enc = ShardEncoder(cfg, fingerprint=fp)
    for p in plans:
        if shard_done(out, p, fp):
            continue
        row = decode_shard({"shard": p.index, "resolution": cfg.resolution,
                            "items": json.dumps([it.to_dict() for it in p.items])})
        enc({k: np.asarray([v], dtype=object) for k, v in row.items()})
        print(f"extracted shard {p.index}", flush=True)
    assemble_manifest(out, plans, name="codec-curves-float16", classes=listing.classes,
                      preprocess={"resolution": cfg.resolution, "crop": "adm-center", "hflip": False},
                      extra_skipped=listing.skipped, created_by={"command": "tests/benchmarks/codec_curves.py"})


def curves(run: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    return {k: np.asarray([r[k] for r in rows]) for k in ("step", "denoise", "proj_loss")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    data, f16, i8 = out / "data", out / "f16", out / "i8"
    if not (data / "n00000000").is_dir():
        sh("pipeline", "synth", "--out", str(data), "--classes", "10", "--per-class", "20")
    extract_inprocess(data, f16)
    sh("pipeline", "convert", "--manifest", str(f16), "--out", str(i8), "--feature-dtype", "int8")
    res = {}
    for name, feats in (("float16", f16), ("int8", i8)):
        run = out / f"run-{name}"
        sh("trainer", "train", "--manifest", str(feats), "--run-dir", str(run), "--model", "SiT-Debug/2",
           "--encoders", ENCODERS, "--enc-depth", "2", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--ckpt-every", str(a.steps), "--log-every", "1", "--precision", "fp32", "--num-workers", "0",
           "--seed", "0")
        res[name] = curves(run)
    report = {}
    for k in ("denoise", "proj_loss"):
        a16, a8 = res["float16"][k], res["int8"][k]
        diff = a8 - a16
        noise = float(np.std(np.diff(a16)))  # step-to-step noise of one run
        report[k] = {"mean_abs_diff": float(np.abs(diff).mean()), "max_abs_diff": float(np.abs(diff).max()),
                     "mean_diff": float(diff.mean()), "step_noise_std": noise,
                     "mean_abs_diff_over_noise": float(np.abs(diff).mean() / noise),
                     "last50_fp16": float(a16[-50:].mean()), "last50_int8": float(a8[-50:].mean())}
        print(f"{k:10s}: |int8 - fp16| mean {report[k]['mean_abs_diff']:.2e}, max {report[k]['max_abs_diff']:.2e}; "
              f"step-to-step noise (std of first differences) {noise:.2e}; "
              f"ratio {report[k]['mean_abs_diff_over_noise']:.3f}; "
              f"last-50 mean fp16 {report[k]['last50_fp16']:.4f} int8 {report[k]['last50_int8']:.4f}")
    (out / "codec_curves.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, (k, title) in enumerate((("denoise", "denoising loss"), ("proj_loss", "REPA loss (-cos)"))):
        for name, style in (("float16", "-"), ("int8", "--")):
            ax[i].plot(res[name]["step"], res[name][k], style, lw=1, label=f"{name} tokens")
        ax[i].set_title(title)
        ax[i].set_xlabel("step")
        ax[i].legend()
    fig.tight_layout()
    fig.savefig(out / "codec_curves.png", dpi=100)
    print(f"wrote {out / 'codec_curves.png'} and {out / 'codec_curves.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
